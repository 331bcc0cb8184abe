"""Malformed and hostile replies are refused with a log line naming the client and the
problem; the client's contribution is dropped, and the others and the adapter are unaffected."""

import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from harness import RANK, FakeGrid, TinyClient, set_task_identity
from mergenet_fl import AdapterConfig, HypernetConfig, PacketError
from mergenet_fl.flower import MergeNet
from mergenet_fl.flower import protocol as p

pytestmark = pytest.mark.hostile


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def make():
    clients = [TinyClient(f"m{i}", "mlp", i) for i in range(3)] + [TinyClient("c0", "cnn", 5)]
    hypernet = HypernetConfig(adapter=AdapterConfig(rank=RANK, dim=8, heads=2, layers=1))
    return FakeGrid(clients), MergeNet(hypernet=hypernet, max_packet_values=2000)


def run(strategy, grid, rounds):
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=rounds, timeout=5)
    strategy.round_offset += rounds


def put(record, key, value):
    record[key] = Array(np.ascontiguousarray(value))


def packet(reply):
    return reply.content.array_records[p.PACKET]


def pieces(reply):
    return reply.content.array_records[p.PIECES]


def identity(reply):
    return reply.content.config_records[p.IDENTITY]


def set_manifest_rank(reply, rank):
    manifest = json.loads(identity(reply)["manifest"])
    manifest["layers"]["3"]["rank"] = rank
    identity(reply)["manifest"] = json.dumps(manifest)


def higher_rank(reply):
    put(packet(reply), "3/A", np.ones((3, RANK + 1), np.float32))
    put(packet(reply), "3/B", np.ones((RANK + 1, 16), np.float32))
    set_manifest_rank(reply, RANK + 1)


TAMPER = {
    "wrong shape": (
        lambda r: put(pieces(r), "3/A", np.zeros((5, RANK), np.float32)),
        "do not fit a 3x16",
    ),
    "NaN": (
        lambda r: put(packet(r), "3/A", np.full_like(packet(r)["3/A"].numpy(), np.nan)),
        "non-finite",
    ),
    "Inf": (lambda r: put(pieces(r), "3/B", np.full((RANK, 16), np.inf, np.float32)), "non-finite"),
    "rank above maximum": (higher_rank, f"rank {RANK + 1} outside"),
    "oversized": (
        lambda r: put(packet(r), "3/B", np.zeros((RANK, 5000), np.float32)),
        "exceed the limit of 2000",
    ),
    "wrong dtype": (
        lambda r: put(packet(r), "3/A", packet(r)["3/A"].numpy().astype(np.float64)),
        "float64",
    ),
    "missing key": (lambda r: packet(r).pop("3/B"), "missing keys ['3/B']"),
    "extra key": (
        lambda r: put(pieces(r), "evil/A", np.zeros((1, 1), np.float32)),
        "unexpected keys ['evil/A']",
    ),
    "identity of another client": (
        lambda r: identity(r).__setitem__("client-id", "m0"),
        "claims to be",
    ),
    "extreme norm": (
        lambda r: put(packet(r), "3/A", packet(r)["3/A"].numpy() * 1e7),
        "factor norm",
    ),
}


def adapter_state(strategy):
    return {k: v.clone() for k, v in strategy.hypernet.adapter.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("attack", sorted(TAMPER))
def test_hostile_reply_is_dropped_and_changes_nothing_else(attack, caplog):
    tamper, message = TAMPER[attack]
    # the reference: the same federation where m1 simply does not answer in round 3
    grid, reference = make()
    run(reference, grid, 2)
    grid.drop.add(grid.node_of("m1"))
    run(reference, grid, 1)

    grid, strategy = make()
    run(strategy, grid, 2)
    bad = grid.node_of("m1")

    def hostile(nid, reply):
        if nid == bad and reply.metadata.message_type == MessageType.TRAIN:
            tamper(reply)
        return reply

    grid.tamper = hostile
    records = []
    strategy.on_round = records.append
    with caplog.at_level(logging.WARNING):
        run(strategy, grid, 1)
    train = next(r for r in records if r["stage"] == "train")
    assert message in train["dropped"]["m1"] and "m1" not in train["clients"]
    assert any("m1" in line and message in line for line in caplog.text.splitlines())
    assert sorted(train["clients"]) == ["c0", "m0", "m2"] and train["server"]["pieces"] == 3.0
    # the others and the adapter: exactly as if m1 had not answered
    a, b = adapter_state(strategy), adapter_state(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert strategy.bank.get("m1").round == 2
    for cid in ("m0", "m2", "c0"):
        got, want = strategy.bank.get(cid).packet.layers, reference.bank.get(cid).packet.layers
        assert all(torch.equal(got[n].a, want[n].a) for n in got)


def test_pieces_are_clipped_to_the_configured_norm():
    grid, strategy = make()
    strategy.clip_pieces = 1.0
    pieces_in = {"3": (torch.full((3, RANK), 10.0), torch.full((RANK, 16), 10.0))}
    clipped = strategy._clip("m1", pieces_in)
    norm = sum(float(t.pow(2).sum()) for t in clipped["3"]) ** 0.5
    assert norm == pytest.approx(1.0)
    strategy.clip_pieces = None
    assert strategy._clip("m1", pieces_in) is pieces_in


# ----------------------------------------------------------------- generated garbage

names = st.sampled_from(["3/A", "3/B", "0/A", "0/B", "x", "3/A/B", ""])
arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float16, np.float64, np.int32, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
    elements=None,
)
records = st.dictionaries(names, arrays, max_size=4)
manifests = st.one_of(
    st.text(max_size=30),
    st.builds(
        lambda rank, shape, kind: json.dumps(
            {"version": 1, "layers": {"3": {"shape": shape, "kind": kind, "rank": rank}}}
        ),
        st.integers(-2, 9),
        st.lists(st.integers(-1, 20), max_size=4),
        st.sampled_from(["linear", "conv2d", "lstm"]),
    ),
)


@st.composite
def garbage_replies(draw):
    content = RecordDict()
    for key in draw(st.sets(st.sampled_from([p.PACKET, p.PIECES, p.SHARED]))):
        content[key] = ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in draw(records).items()}
        )
    if draw(st.booleans()):
        content[p.IDENTITY] = ConfigRecord(
            {
                "client-id": draw(st.sampled_from(["m1", "m0", "", "ghost"])),
                "group": draw(st.sampled_from(["mlp", "cnn", ""])),
                "send-only": draw(st.booleans()),
                "manifest": draw(manifests),
            }
        )
    if draw(st.booleans()):
        metrics = {"num-examples": draw(st.sampled_from([32, -1, 0]))}
        metrics["loss"] = draw(st.floats(allow_nan=True, allow_infinity=True))
        content[p.METRICS] = MetricRecord(metrics)
    return content


@pytest.fixture(scope="module")
def transfer_round():
    """A strategy in the middle of a transfer round (merged factors sent, replies due)."""
    set_task_identity()
    grid, strategy = make()
    run(strategy, grid, 2)
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    return grid, strategy, strategy.generation, messages


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(content=garbage_replies())
def test_generated_garbage_never_crashes_or_changes_state(transfer_round, content):
    grid, strategy, generation, messages = transfer_round
    strategy.generation = generation
    msg = next(m for m in messages if m.metadata.dst_node_id == grid.node_of("m1"))
    before = (adapter_state(strategy), strategy.bank.state_dict(), dict(strategy.group_arrays))
    strategy.aggregate_train(1, [Message(content, reply_to=msg)])
    after = (adapter_state(strategy), strategy.bank.state_dict(), dict(strategy.group_arrays))
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    entries, again = before[1]["entries"], after[1]["entries"]
    assert entries.keys() == again.keys()
    assert all(entries[c]["round"] == again[c]["round"] for c in entries)
    assert before[2].keys() == after[2].keys()


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    garbage=st.dictionaries(
        st.sampled_from(["m0", "m1", "c0", "ghost"]),
        st.dictionaries(
            st.sampled_from(["3", "0", "x"]),
            st.tuples(
                hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=20)),
                hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=20)),
            ),
            max_size=2,
        ),
        min_size=1,
        max_size=3,
    )
)
def test_adapter_update_refuses_garbage_without_changing(transfer_round, garbage):
    _, strategy, generation, _ = transfer_round
    pieces_in = {
        cid: {layer: (torch.from_numpy(a), torch.from_numpy(b)) for layer, (a, b) in layers.items()}
        for cid, layers in garbage.items()
    }
    before = adapter_state(strategy)
    try:
        strategy.hypernet.update(generation, pieces_in)
    except PacketError:
        after = adapter_state(strategy)
        assert all(torch.equal(before[k], after[k]) for k in before)
    else:  # only well-formed, finite pieces for clients that were sent factors get here
        assert all(cid in generation.targets() for cid in pieces_in)


def test_new_node_claiming_a_live_client_is_refused(caplog):
    grid, strategy = make()
    run(strategy, grid, 1)
    genuine = grid.node_of("m0")
    grid.nodes[4242] = TinyClient("m0", "mlp", 99)  # an impostor beside the real m0
    records = []
    strategy.on_round = records.append
    with caplog.at_level(logging.WARNING):
        run(strategy, grid, 1)
    assert strategy.identities[genuine].client_id == "m0" and 4242 not in strategy.identities
    train = next(r for r in records if r["stage"] == "train")
    assert f"which node {genuine} is" in train["dropped"]["node 4242"]
    assert "m0" in train["clients"] and "identity query" in caplog.text
