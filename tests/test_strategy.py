import logging

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType

from harness import RANK, FakeGrid, TinyClient, set_task_identity
from mergenet_fl import AdapterConfig, HypernetConfig
from mergenet_fl.flower import GroupFedAvg, LocalOnly, MergeNet
from mergenet_fl.flower import protocol as p


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def federation(seed=0):
    clients = [
        TinyClient("m0", "mlp", 0),
        TinyClient("m1", "mlp", 1),
        TinyClient("c0", "cnn", 2),
        TinyClient("c1", "cnn", 3),
    ]
    return FakeGrid(clients, seed=seed)


def strategy(**kwargs):
    hypernet = HypernetConfig(adapter=AdapterConfig(rank=RANK, dim=8, heads=2, layers=1))
    return MergeNet(hypernet=hypernet, **kwargs)


def run(strat, grid, rounds):
    return strat.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=rounds, timeout=10)


def train_messages(grid, round_):
    return [
        m
        for m in grid.sent
        if m.metadata.message_type == MessageType.TRAIN
        and m.content.config_records[p.CONFIG][p.ROUND] == round_
    ]


def test_transfer_cycle_and_per_node_payloads():
    grid, strat = federation(), strategy(transfer_every=2)
    records = []
    strat.on_round = records.append
    run(strat, grid, 5)
    for rnd in range(1, 6):
        msgs = train_messages(grid, rnd)
        assert len(msgs) == 4
        has_merged = [p.MERGED in m.content.array_records for m in msgs]
        assert all(has_merged) == (rnd in (3, 5)) and any(has_merged) == (rnd in (3, 5))
        send_packet = {m.content.config_records[p.CONFIG][p.SEND_PACKET] for m in msgs}
        assert send_packet == {rnd in (2, 4)}
    msgs = train_messages(grid, 3)
    assert len({id(m.content) for m in msgs}) == 4  # a new RecordDict per node
    by_client = {strat.identities[m.metadata.dst_node_id].client_id: m for m in msgs}
    m0 = by_client["m0"].content.array_records[p.MERGED]["3/A"].numpy()
    m1 = by_client["m1"].content.array_records[p.MERGED]["3/A"].numpy()
    assert m0.shape == (3, RANK) and not np.allclose(m0, m1)
    assert set(by_client["c0"].content.array_records[p.MERGED]) == {"0/A", "0/B"}
    train = [r for r in records if r["stage"] == "train"]
    assert [r["server"].get("pieces") for r in train] == [None, None, 4.0, None, 4.0]
    assert sorted(strat.bank) == ["c0", "c1", "m0", "m1"]


def test_metrics_per_group_and_overall():
    grid, strat = federation(), strategy()
    result = run(strat, grid, 2)
    train = result.train_metrics_clientapp[2]
    assert train["num-examples"] == 128 and train["mlp/num-examples"] == 64
    assert {"train_loss", "mlp/train_loss", "cnn/train_loss", "bytes"} <= set(train)
    evaluate = result.evaluate_metrics_clientapp[2]
    assert 0.0 <= evaluate["cnn/accuracy"] <= 1.0


def test_failed_and_missing_replies_are_skipped(caplog):
    grid, strat = federation(), strategy()
    records = []
    strat.on_round = records.append

    def boom(msg):
        raise RuntimeError("out of memory")

    grid.nodes[grid.node_of("c1")].on_train = boom
    grid.drop.add(grid.node_of("m1"))
    with caplog.at_level(logging.WARNING):
        run(strat, grid, 3)
    train = [r for r in records if r["stage"] == "train"]
    for record in train:  # known from the identity handshake, so named in the log
        assert "out of memory" in record["dropped"]["c1"]
        # m1 never answered, not even the handshake: it is known by its node id only
        assert (
            record["dropped"][f"node {grid.node_of('m1')}"] == "no reply (timeout or disconnected)"
        )
    assert sorted(train[-1]["clients"]) == ["c0", "m0"]
    assert "out of memory" in caplog.text and "no reply" in caplog.text
    assert sorted(strat.bank) == ["c0", "m0"]  # the round went on for the others


def test_wrong_shapes_are_rejected_with_a_clear_log_line(caplog):
    grid, strat = federation(), strategy()
    records = []
    strat.on_round = records.append
    bad_node = None

    def tamper(nid, reply):
        if nid == bad_node and p.PIECES in reply.content.array_records:
            rec = reply.content.array_records[p.PIECES]
            rec["3/A"] = ArrayRecord({"x": torch.zeros(5, RANK)})["x"]
        return reply

    run(strat, grid, 1)  # learn identities
    bad_node = grid.node_of("m1")
    grid.tamper = tamper
    with caplog.at_level(logging.WARNING):
        run(strat, grid, 2)
    assert "dropped client 'm1'" in caplog.text and "do not fit a 3x16" in caplog.text
    last = [r for r in records if r["stage"] == "train"][-1]
    assert "m1" in last["dropped"] and "m1" not in last["clients"]
    assert last["server"]["pieces"] == 3.0  # the others still updated the adapter


def test_identity_survives_a_new_node_id():
    grid, strat = federation(), strategy()
    run(strat, grid, 2)
    old = grid.node_of("c0")
    client = grid.nodes.pop(old)
    grid.nodes[12345] = client  # reconnects under another node id
    records = []
    strat.on_round = records.append
    run(strat, grid, 2)
    assert strat.identities[12345].client_id == "c0" and old not in strat.identities
    msgs = train_messages(grid, 2)
    to_new = [m for m in msgs if m.metadata.dst_node_id == 12345]
    assert p.MERGED in to_new[-1].content.array_records  # its history came along
    queries = [m for m in grid.sent if m.metadata.message_type == MessageType.QUERY]
    assert [m.metadata.dst_node_id for m in queries][-1] == 12345


def test_group_aggregation_of_unselected_parameters():
    grid, strat = federation(), strategy(share="unselected")
    run(strat, grid, 2)
    m0 = grid.nodes[grid.node_of("m0")].model()
    m1 = grid.nodes[grid.node_of("m1")].model()
    # layer 1 is shared inside the group: both started round 2 from the same average
    avg = strat.group_arrays["mlp"]
    assert set(avg) == {"1.weight", "1.bias", "3.bias"}  # the transfer weight 3.weight stays
    assert not torch.equal(m0[3].weight, m1[3].weight)
    msgs = train_messages(grid, 2)
    assert all(p.GROUP_ARRAYS in m.content.array_records for m in msgs)


def test_group_targets_send_a_group_one_merged_factor_set():
    grid = federation()
    hypernet = HypernetConfig(
        adapter=AdapterConfig(rank=RANK, dim=8, heads=2, layers=1), group_targets=True
    )
    strat = MergeNet(hypernet=hypernet, share="unselected")
    records = []
    strat.on_round = records.append
    run(strat, grid, 2)
    msgs = {strat.identities[m.metadata.dst_node_id].client_id: m for m in train_messages(grid, 2)}
    merged = {cid: p.from_record(m.content.array_records[p.MERGED]) for cid, m in msgs.items()}
    for a, b in (("m0", "m1"), ("c0", "c1")):
        assert merged[a].keys() == merged[b].keys()
        assert all(np.array_equal(merged[a][k], merged[b][k]) for k in merged[a])
    assert not np.array_equal(merged["m0"]["3/A"], strat.bank.get("m0").packet.layers["3"].a)
    # every member's pieces went into the adapter step, two rows' worth
    train = [r for r in records if r["stage"] == "train"]
    assert train[1]["server"]["pieces"] == 4.0 and train[1]["server"]["grad_norm"] > 0


def test_baselines():
    grid, local = federation(), LocalOnly()
    records = []
    local.on_round = records.append
    run(local, grid, 2)
    assert all(not m.content.array_records for m in grid.sent)
    assert all(c["bytes_up"] == 0 for c in records[-2]["clients"].values())

    grid, fedavg = federation(), GroupFedAvg()
    run(fedavg, grid, 2)
    avg = fedavg.group_arrays["cnn"]
    c0 = grid.nodes[grid.node_of("c0")]
    np.testing.assert_allclose(
        avg["0.weight"],
        (
            c0.model()[0].weight.detach().numpy()
            + grid.nodes[grid.node_of("c1")].model()[0].weight.detach().numpy()
        )
        / 2,
        rtol=1e-6,
    )


def test_strategy_state_round_trip():
    grid, strat = federation(), strategy(share="unselected")
    run(strat, grid, 2)
    state = strat.state_dict()
    again = strategy(share="unselected")
    again.load_state_dict(state)
    assert sorted(again.bank) == sorted(strat.bank)
    s1, s2 = strat.hypernet.adapter.state_dict(), again.hypernet.adapter.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert again.group_arrays.keys() == strat.group_arrays.keys()


def test_default_hypernet_has_group_targets_when_groups_share():
    assert MergeNet(share="unselected").hypernet.cfg.group_targets
    assert not MergeNet(share="none").hypernet.cfg.group_targets


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="transfer_every"):
        MergeNet(transfer_every=0)
    with pytest.raises(ValueError, match="share='some'"):
        MergeNet(share="some")
    with pytest.raises(ValueError, match="fraction_train"):
        LocalOnly(fraction_train=1.5)


def test_config_passes_through():
    grid, strat = federation(), strategy()
    strat.start(
        grid=grid,
        initial_arrays=ArrayRecord(),
        num_rounds=1,
        timeout=10,
        train_config=ConfigRecord({"local-epochs": 3}),
    )
    assert all(
        m.content.config_records[p.CONFIG]["local-epochs"] == 3 for m in train_messages(grid, 1)
    )
