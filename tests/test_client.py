import pytest
import torch
from torch import nn

from mergenet_fl import (
    LayerSpec,
    PacketError,
    export_packet,
    factorize,
    gradient_pieces,
    install_merged,
    pad_rank,
    select_layers,
)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 10))


def test_export_packet_encodes_selected_layers():
    model = tiny_model()
    layers = select_layers(model, LayerSpec(["0", "2"]))
    packet = export_packet(model, layers, rank=4)
    assert packet.matrix_shapes() == {"0": (6, 27), "2": (10, 96)}
    assert packet.layers["0"].weight_shape == (6, 3, 3, 3) and packet.layers["0"].kind == "conv2d"
    a, b = factorize(model[2].weight.detach(), 4)
    assert torch.equal(packet.layers["2"].a, a) and torch.equal(packet.layers["2"].b, b)


def test_install_replaces_only_the_low_rank_part():
    model = tiny_model()
    layers = select_layers(model, LayerSpec(["0", "2"]))
    w_conv = model[0].weight.detach().reshape(6, 27).clone()
    w_fc = model[2].weight.detach().clone()
    a, b = factorize(w_conv, 3)
    a_new, b_new = torch.randn(6, 3), torch.randn(3, 27)
    installed = install_merged(model, layers, {"0": (a_new, b_new)}, rank=3)
    expected = w_conv - a @ b + a_new @ b_new
    torch.testing.assert_close(model[0].weight.detach(), expected.reshape(6, 3, 3, 3))
    assert torch.equal(model[2].weight.detach(), w_fc)  # not in the message: untouched
    assert set(installed) == {"0"}
    # what stays is the residual: the part of W outside its own rank-3 encoding
    residual = model[0].weight.detach().reshape(6, 27) - a_new @ b_new
    torch.testing.assert_close(residual, w_conv - a @ b)


def test_installing_own_factors_changes_nothing():
    model = tiny_model()
    layers = select_layers(model, LayerSpec(["2"]))
    before = model[2].weight.detach().clone()
    own = export_packet(model, layers, rank=4).factors()
    install_merged(model, layers, own, rank=4)
    assert torch.equal(model[2].weight.detach(), before)
    # padded to a larger adapter rank: equal up to rounding
    padded = {n: pad_rank(a, b, 8) for n, (a, b) in own.items()}
    install_merged(model, layers, padded, rank=4)
    torch.testing.assert_close(model[2].weight.detach(), before)


def test_gradient_pieces_match_the_full_delta():
    model = tiny_model()
    layers = select_layers(model, LayerSpec(["2"]))
    a_new, b_new = torch.randn(10, 8), torch.randn(8, 96)
    installed = install_merged(model, layers, {"2": (a_new, b_new)}, rank=4)
    w_new = model[2].weight.detach().clone()
    with torch.no_grad():  # "local training"
        model[2].weight.add_(torch.randn(10, 96) * 0.1)
    pieces = gradient_pieces(model, layers, installed)
    delta = w_new - model[2].weight.detach()
    g_a, g_b = pieces["2"]
    assert g_a.shape == (10, 8) and g_b.shape == (8, 96)
    torch.testing.assert_close(g_a, delta @ b_new.T)
    torch.testing.assert_close(g_b, a_new.T @ delta)
    # they are the gradient of <A'B', Δ> with respect to A' and B'
    a_req, b_req = a_new.clone().requires_grad_(), b_new.clone().requires_grad_()
    ((a_req @ b_req) * delta).sum().backward()
    torch.testing.assert_close(g_a, a_req.grad)
    torch.testing.assert_close(g_b, b_req.grad)


def test_install_rejects_bad_factors():
    model = tiny_model()
    layers = select_layers(model, LayerSpec(["2"]))
    with pytest.raises(PacketError, match=r"not selected: \['0'\]"):
        install_merged(model, layers, {"0": (torch.zeros(6, 2), torch.zeros(2, 27))}, rank=2)
    with pytest.raises(PacketError, match=r"'2'.*do not fit a 10x96"):
        install_merged(model, layers, {"2": (torch.zeros(9, 2), torch.zeros(2, 96))}, rank=2)
