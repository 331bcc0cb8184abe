import json

import numpy as np
import pytest
import torch

from mergenet_fl import (
    KnowledgePacket,
    LayerFactors,
    PacketError,
    decode_factors,
    encode_factors,
    factorize,
    factorize_product,
    pad_rank,
)


def test_factorize_is_best_rank_r_and_deterministic():
    w = torch.randn(20, 30, generator=torch.Generator().manual_seed(0))
    a, b = factorize(w, 4)
    assert a.shape == (20, 4) and b.shape == (4, 30)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(a @ b, best, atol=1e-5, rtol=1e-5)
    a2, b2 = factorize(w.clone(), 4)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    # sign convention: the largest-magnitude entry of each column of A is positive
    cols = torch.arange(4)
    assert (a[a.abs().argmax(0), cols] > 0).all()
    # the same weight with a flipped singular pair still gives the same factors
    a3, b3 = factorize(-w, 4)
    torch.testing.assert_close(a3 @ b3, -(a @ b), atol=1e-5, rtol=1e-5)
    assert (a3[a3.abs().argmax(0), cols] > 0).all()


def test_randomized_svd_above_threshold_is_deterministic_and_accurate():
    gen = torch.Generator().manual_seed(1)
    low = torch.randn(300, 6, generator=gen) @ torch.randn(6, 400, generator=gen)
    a, b = factorize(low, 6, randomized_min_size=1000)
    a2, b2 = factorize(low, 6, randomized_min_size=1000)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    torch.testing.assert_close(a @ b, low, atol=1e-3, rtol=1e-3)
    ref_a, _ = factorize(low, 6, randomized_min_size=10**9)
    torch.testing.assert_close(a, ref_a, atol=1e-3, rtol=1e-3)  # same sign convention


def test_factorize_caps_rank_and_rejects_bad_input():
    a, b = factorize(torch.randn(3, 50), 8)
    assert a.shape == (3, 3) and b.shape == (3, 50)
    with pytest.raises(ValueError, match="matrix"):
        factorize(torch.randn(2, 3, 4), 2)
    with pytest.raises(ValueError, match="rank"):
        factorize(torch.randn(3, 3), 0)


@pytest.mark.parametrize(
    ("m", "n", "k"),
    [(64, 800, 8), (40, 30, 24), (20, 30, 3), (10, 12, 16)],  # the last forms the product
)
def test_factorize_product_is_factorize_of_the_product(m, n, k):
    gen = torch.Generator().manual_seed(k)
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    got = factorize_product(a, b, 8)
    want = factorize(a @ b, 8, randomized_min_size=m * n + 1)
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape  # rank min(8, m, n)
    torch.testing.assert_close(got[0] @ got[1], want[0] @ want[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0], want[0], atol=2e-3, rtol=1e-3)  # same signs and split


def test_pad_rank_keeps_product():
    a, b = factorize(torch.randn(10, 12), 3)
    pa, pb = pad_rank(a, b, 8)
    assert pa.shape == (10, 8) and pb.shape == (8, 12)
    assert torch.equal(pa[:, 3:], torch.zeros(10, 5))
    torch.testing.assert_close(pa @ pb, a @ b)


def make_packet() -> KnowledgePacket:
    a1, b1 = factorize(torch.randn(10, 16), 4)
    a2, b2 = factorize(torch.randn(6, 3 * 3 * 3), 4)
    return KnowledgePacket(
        {
            "fc": LayerFactors(a1, b1, (10, 16), "linear"),
            "conv": LayerFactors(a2, b2, (6, 3, 3, 3), "conv2d"),
        }
    )


def test_packet_round_trip_float32_and_float16():
    packet = make_packet()
    arrays, manifest = packet.to_wire()
    assert set(arrays) == {"fc/A", "fc/B", "conv/A", "conv/B"}
    back = KnowledgePacket.from_wire(arrays, manifest, max_rank=8)
    for name, lf in packet.layers.items():
        got = back.layers[name]
        assert torch.equal(got.a, lf.a) and torch.equal(got.b, lf.b)
        assert got.weight_shape == lf.weight_shape and got.kind == lf.kind
    assert back.signature() == packet.signature()
    half, manifest = packet.to_wire(np.float16)
    back = KnowledgePacket.from_wire(half, manifest, max_rank=8)
    torch.testing.assert_close(back.layers["fc"].a, packet.layers["fc"].a, atol=2e-3, rtol=2e-3)


def corrupt(fn):
    arrays, manifest = make_packet().to_wire()
    arrays = dict(arrays)
    manifest = json.loads(manifest)
    fn(arrays, manifest)
    return arrays, json.dumps(manifest)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda a, m: a.update({"fc/A": a["fc/A"][:5]}), r"layer 'fc'.*do not fit a 10x16"),
        (lambda a, m: a.update({"fc/B": a["fc/B"][:3]}), r"layer 'fc'.*A has rank 4, B has rank 3"),
        (lambda a, m: a["conv/B"].__setitem__((0, 0), np.nan), r"layer 'conv'.*non-finite"),
        (lambda a, m: a["fc/A"].__setitem__((0, 0), np.inf), r"layer 'fc'.*non-finite"),
        (lambda a, m: a.update({"fc/A": a["fc/A"].astype(np.float64)}), r"'fc'.*float64"),
        (lambda a, m: a.update({"fc/A": a["fc/A"].astype(np.int32)}), r"'fc'.*int32"),
        (lambda a, m: a.pop("conv/B"), r"missing keys \['conv/B'\]"),
        (lambda a, m: a.update({"evil/A": np.zeros((1, 1), np.float32)}), r"unexpected.*evil/A"),
        (lambda a, m: m["layers"]["fc"].update(rank=2), r"'fc'.*manifest says rank 2"),
        (lambda a, m: m["layers"]["fc"].update(kind="conv2d"), r"'fc'.*kind 'conv2d'"),
        (lambda a, m: m["layers"]["fc"].update(shape=[10, -16]), r"'fc'.*bad weight shape"),
        (lambda a, m: m.update(version=99), r"no version 1"),
        (lambda a, m: m.update(layers={}), r"lists no layers"),
    ],
)
def test_packet_validation_errors(mutate, message):
    arrays, manifest = corrupt(mutate)
    with pytest.raises(PacketError, match=message):
        KnowledgePacket.from_wire(arrays, manifest, max_rank=8)


def test_packet_rank_and_size_limits_and_bad_json():
    arrays, manifest = make_packet().to_wire()
    with pytest.raises(PacketError, match=r"rank 4 outside \[1, 2\]"):
        KnowledgePacket.from_wire(arrays, manifest, max_rank=2)
    with pytest.raises(PacketError, match="exceed the limit of 100"):
        KnowledgePacket.from_wire(arrays, manifest, max_rank=8, max_values=100)
    with pytest.raises(PacketError, match="not valid JSON"):
        KnowledgePacket.from_wire(arrays, "{nope", max_rank=8)


def test_factor_encoding_round_trip():
    factors = {"x": (torch.randn(3, 2), torch.randn(2, 5))}
    back = decode_factors(encode_factors(factors), {"x": (3, 5)}, max_rank=2)
    assert torch.equal(back["x"][0], factors["x"][0]) and torch.equal(back["x"][1], factors["x"][1])


def test_aligned_signs_do_not_flip_under_a_small_weight_change():
    from mergenet_fl import KnowledgeBank, KnowledgePacket, LayerFactors, align_signs

    gen = torch.Generator().manual_seed(0)
    # Singular vectors whose entries are nearly equal in magnitude (as in a classifier whose
    # classes are alike): the largest-entry rule then flips with any small change.
    h = torch.tensor([[1.0]])
    for _ in range(3):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    v, _ = torch.linalg.qr(torch.randn(64, 8, generator=gen))
    w = (h / 8**0.5) @ torch.diag(torch.linspace(8, 1, 8)) @ v.T  # (8, 64)
    bank = KnowledgeBank()
    flips_fixed_rule = flips_aligned = 0
    last_fixed = last_aligned = None
    for step in range(50):
        w = w + 1e-3 * w.abs().mean() * torch.randn(8, 64, generator=gen)
        a, b = factorize(w, 8)
        aligned = a if last_aligned is None else align_signs(a, b, last_aligned)[0]
        if last_fixed is not None:
            flips_fixed_rule += int(((a * last_fixed).sum(0) < 0).sum())
            flips_aligned += int(((aligned * last_aligned).sum(0) < 0).sum())
            assert torch.allclose(aligned @ align_signs(a, b, last_aligned)[1], a @ b)
        last_fixed, last_aligned = a, aligned
        packet = KnowledgePacket({"fc": LayerFactors(a, b, (8, 64), "linear")})
        bank.put("c", packet, group="g", round=step)
    assert flips_aligned == 0 < flips_fixed_rule
    assert torch.equal(bank.get("c").packet.layers["fc"].a, last_aligned)  # the bank aligns too
