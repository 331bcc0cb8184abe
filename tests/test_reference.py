"""``adapter=reference``: the reference code's adapter on whole weights, in the federation."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from torch import nn

from harness import FakeGrid, TinyClient, set_task_identity
from mergenet_fl import (
    AdapterConfig,
    HypernetConfig,
    Hypernetwork,
    KnowledgeBank,
    KnowledgePacket,
    LayerFactors,
    PacketError,
    as_spec,
    encode_factors,
    export_packet,
    gradient_pieces,
    select_layers,
)
from mergenet_fl.flower import MergeNet
from mergenet_fl.flower import client as mc
from mergenet_fl.flower import protocol as p
from mergenet_fl.reference import attention_width
from mergenet_fl.selection import get_matrix
from simulations.config import compose
from simulations.preflight import problems

REFERENCE = AdapterConfig(variant="reference", heads=2, layers=2)


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def conv_bn(seed: int) -> nn.Module:
    """A 1x1 convolution that BatchNorm follows (the reference's kind of target) and a head."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4, 5)
    )


def whole(w: torch.Tensor, shape=None, kind="linear") -> LayerFactors:
    return LayerFactors(torch.eye(w.shape[0]), w, shape or tuple(w.shape), kind, True)


def pair_bank(target: torch.Tensor, source: torch.Tensor) -> KnowledgeBank:
    bank = KnowledgeBank()
    bank.put("t", KnowledgePacket({"l": whole(target)}), group="target", round=1)
    bank.put("s", KnowledgePacket({"fc": whole(source)}), group="source", round=1, send_only=True)
    return bank


def test_attention_widths_are_the_reference_codes():
    # MobileNetV2's 160x960 target, ResNet-50's 100x2048 source: 1504 / 528 / 1104 / 128
    assert [
        attention_width(q, k, 8) for q, k in [(960, 2048), (960, 100), (160, 2048), (160, 100)]
    ] == [
        1504,
        528,
        1104,
        128,
    ]


def test_whole_weights_travel_as_identity_and_weight_and_hostile_ones_are_refused():
    model = conv_bn(0)
    layers = select_layers(model, as_spec(["0"]))
    packet = export_packet(model, layers, rank=4, full=True)
    lf = packet.layers["0"]
    assert lf.full and torch.equal(lf.a, torch.eye(6))
    assert torch.equal(lf.b, get_matrix(model, layers[0]))  # the whole weight, nothing truncated
    arrays, manifest = packet.to_wire()
    back = KnowledgePacket.from_wire(arrays, manifest, max_rank=64)
    assert back.layers["0"].full and torch.equal(back.layers["0"].b, lf.b)
    with pytest.raises(PacketError, match="rank 6 outside"):  # more rows than the server allows
        KnowledgePacket.from_wire(arrays, manifest, max_rank=4)
    forged = {**arrays, "0/A": arrays["0/A"] * 2}
    with pytest.raises(PacketError, match="not the identity"):
        KnowledgePacket.from_wire(forged, manifest, max_rank=64)
    with pytest.raises(PacketError, match="encoding 'dense'"):
        KnowledgePacket.from_wire(arrays, manifest.replace('"full"', '"dense"'), max_rank=64)


def test_the_installed_weight_is_the_generated_one():
    model = conv_bn(0)
    layers = select_layers(model, as_spec(["0"]))
    bank = KnowledgeBank()
    bank.put("t", export_packet(model, layers, 4, full=True), group="target", round=1)
    bank.put("s", KnowledgePacket({"fc": whole(torch.randn(5, 24))}), group="source", round=1)
    hn = Hypernetwork(HypernetConfig(adapter=REFERENCE))
    merged, generation = hn.generate(bank, ["t"], round=2)
    eye, generated = merged["t"]["0"]
    assert torch.equal(eye, torch.eye(6))
    before = get_matrix(model, layers[0]).clone()
    # through the wire, as a client gets it
    content = RecordDict({p.CONFIG: ConfigRecord({p.ROUND: 2, p.ADAPTER_RANK: hn.rank})})
    content[p.MERGED] = p.to_record(encode_factors(merged["t"]))
    content[p.OWN] = p.to_record(encode_factors(generation.inputs()["t"]))
    installed = mc.install_factors(
        Message(content, dst_node_id=1, message_type="train"), model, layers, rank=4
    )
    written = get_matrix(model, layers[0])
    assert torch.allclose(written, generated, atol=1e-5) and not torch.allclose(written, before)
    # the generated rows are layer-normalised: the scale that the BatchNorm after it absorbs
    assert torch.allclose(generated.norm(dim=1), torch.full((6,), 3**0.5), atol=1e-2)
    # the piece the adapter learns from is Δ itself
    with torch.no_grad():
        model[0].weight.mul_(0.5)
    _, g_b = gradient_pieces(model, layers, installed)["0"]
    assert torch.allclose(g_b, written - get_matrix(model, layers[0]), atol=1e-6)


def test_a_recomputed_pass_replays_the_dropout_of_the_generating_pass():
    bank = pair_bank(torch.randn(4, 6), torch.randn(3, 5))
    bank.put("t2", KnowledgePacket({"l": whole(torch.randn(4, 6))}), group="target", round=1)
    hn = Hypernetwork(HypernetConfig(adapter=REFERENCE, chunk_size=1))  # no graph kept
    merged, generation = hn.generate(bank, ["t", "t2"], round=2)
    assert not generation.outputs
    (job,) = generation.jobs
    for chunk, _, out_b in hn._passes(generation, 0, [0, 1]):
        for i, row in enumerate(chunk):
            (cid,) = job.members[row]
            # the same dropout masks; spectral norm's power iteration moved on by one step
            assert torch.allclose(out_b[i].detach(), merged[cid]["l"][1], atol=1e-4)
    # without the replay the dropout draws another mask: the test above can fail
    a, b = job.a[:1], job.b[:1]
    once, again = hn.adapter(a, b, job.sources)[1], hn.adapter(a, b, job.sources)[1]
    assert (once - again).abs().max() > 1e-2


def test_the_update_learns_only_the_generated_weight():
    bank = pair_bank(torch.randn(4, 6), torch.randn(3, 5))
    hn = Hypernetwork(HypernetConfig(adapter=REFERENCE, lr=1e-2, optimizer="adamw"))
    goal = torch.randn(4, 6)
    distance = []
    for rnd in range(2, 30):
        merged, generation = hn.generate(bank, ["t"], round=rnd)
        eye, generated = merged["t"]["l"]
        distance.append(float((generated - goal).norm()))
        delta = generated - goal  # as if training moved the installed weight to the goal
        hn.update(generation, {"t": {"l": (delta @ generated.T, eye.T @ delta)}})
    assert distance[-1] < 0.8 * distance[0]


def test_the_transfer_effect_is_zero_when_the_source_is_the_target_itself():
    target = torch.randn(4, 6)
    same = Hypernetwork(HypernetConfig(adapter=REFERENCE))
    _, generation = same.generate(pair_bank(target, target.clone()), ["t"], round=2)
    assert generation.diagnostics["t"]["l"]["transfer_effect"] == pytest.approx(0.0, abs=1e-6)
    other = Hypernetwork(HypernetConfig(adapter=REFERENCE))
    _, generation = other.generate(pair_bank(target, torch.randn(4, 6)), ["t"], round=2)
    assert generation.diagnostics["t"]["l"]["transfer_effect"] > 1e-3


def test_a_group_summary_of_whole_weights_is_their_mean():
    bank = KnowledgeBank()
    weights = [torch.randn(4, 6) for _ in range(3)]
    for i, w in enumerate(weights):
        bank.put(f"c{i}", KnowledgePacket({"l": whole(w)}), group="g", round=1)
    summary = bank.summary("g", rank=2).layers["l"]
    assert summary.full and torch.equal(summary.a, torch.eye(4))
    assert torch.allclose(summary.b, torch.stack(weights).mean(0))


def test_the_optimiser_decays_no_bias_or_norm_and_holds_before_the_cosine():
    hn = Hypernetwork(
        HypernetConfig(
            adapter=REFERENCE,
            optimizer="adamw",
            lr=1e-2,
            weight_decay=5e-4,
            hold_steps=3,
            decay_steps=10,
        )
    )
    hn.generate(pair_bank(torch.randn(4, 6), torch.randn(3, 5)), ["t"], round=2)
    for group in hn.optimizer.param_groups:
        dims = {p.ndim for p in group["params"]}
        assert (group["weight_decay"] == 0.0) == (dims == {1}), (dims, group["weight_decay"])
    assert [hn.lr_at(s) for s in (0, 3)] == [1e-2, 1e-2]
    assert hn.lr_at(8) == pytest.approx(5e-3) and hn.lr_at(13) == pytest.approx(0.0)


def test_a_federation_of_whole_weights_runs_and_refuses_low_rank_packets():
    clients = [TinyClient("m0", "mlp", 0), TinyClient("c0", "cnn", 1)]
    grid = FakeGrid(clients)
    strat = MergeNet(hypernet=HypernetConfig(adapter=REFERENCE, lr=1e-3))
    records = []
    strat.on_round = records.append
    strat.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=3, timeout=10)
    train = [r for r in records if r["stage"] == "train"]
    assert [r["server"].get("pieces") for r in train] == [None, 2.0, 2.0]
    merged = [
        m.content.array_records[p.MERGED]
        for m in grid.sent
        if m.metadata.message_type == MessageType.TRAIN and p.MERGED in m.content.array_records
    ]
    assert {tuple(r["3/A"].numpy().shape) for r in merged if "3/A" in r} == {(3, 3)}
    assert all(strat.bank.get(c).packet.layers[n].full for c, n in (("m0", "3"), ("c0", "0")))
    # a client that sends low-rank factors to a server that takes whole weights is refused
    low = export_packet(clients[0].model(), clients[0].layers, rank=2)
    arrays, manifest = low.to_wire()
    reply = strat_reply(strat, clients[0], arrays, manifest)
    with pytest.raises(PacketError, match="takes whole weights"):
        strat.validate(4, reply)


def strat_reply(strat, client, arrays, manifest):
    from mergenet_fl.flower.base import ClientReply

    content = RecordDict({p.PACKET: p.to_record(arrays)})
    return ClientReply(0, client.identity, manifest, {}, content, 0)


def test_preflight_refuses_a_layer_too_large_to_travel_whole():
    cfg = compose(
        "federation=reference protocol=reference strategy=mergenet adapter=reference "
        "adapter.max_rows=32"
    )
    found = problems(cfg)
    assert any("features.16.conv.2" in f and "max_rows=32" in f for f in found), found
    assert not [
        f
        for f in problems(
            compose("federation=reference protocol=reference strategy=mergenet adapter=reference")
        )
        if "max_rows" in f
    ]
