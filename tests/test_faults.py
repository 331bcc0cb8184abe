"""Clients that fail, never answer, join late or leave: the run goes on."""

import logging

import pytest
from flwr.app import ArrayRecord, MessageType

from harness import RANK, FakeGrid, TinyClient, set_task_identity
from mergenet_fl import AdapterConfig, HypernetConfig
from mergenet_fl.flower import MergeNet
from mergenet_fl.flower import protocol as p

pytestmark = pytest.mark.faults


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def make(**kwargs):
    clients = [TinyClient(f"m{i}", "mlp", i) for i in range(2)] + [TinyClient("c0", "cnn", 5)]
    hypernet = HypernetConfig(adapter=AdapterConfig(rank=RANK, dim=8, heads=2, layers=1))
    strategy = MergeNet(hypernet=hypernet, **kwargs)
    records = []
    strategy.on_round = records.append
    return FakeGrid(clients), strategy, records


def run(strategy, grid, rounds):
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=rounds, timeout=5)
    strategy.round_offset += rounds  # the next start() continues the same run


def train(records, rnd):
    return next(r for r in records if r["round"] == rnd and r["stage"] == "train")


def test_client_that_raises_and_one_that_never_answers(caplog):
    grid, strategy, records = make()
    run(strategy, grid, 1)

    def boom(msg):
        raise RuntimeError("CUDA error: device lost")

    grid.nodes[grid.node_of("m1")].on_train = boom
    grid.drop.add(grid.node_of("c0"))
    with caplog.at_level(logging.INFO):
        run(strategy, grid, 2)
    for rnd in (2, 3):
        record = train(records, rnd)
        assert "device lost" in record["dropped"]["m1"]
        assert record["dropped"]["c0"] == "no reply (timeout or disconnected)"
        assert list(record["clients"]) == ["m0"]
    assert "device lost" in caplog.text and "no reply from c0" in caplog.text
    # the bank keeps each client's last packet: m1 and c0 from round 1
    assert {c: strategy.bank.get(c).round for c in strategy.bank} == {"m0": 3, "m1": 1, "c0": 1}


def test_late_joiner_gets_merged_factors_after_its_first_packet():
    grid, strategy, records = make()
    late = grid.nodes.pop(grid.node_of("c0"))
    run(strategy, grid, 2)
    grid.nodes[777] = late  # joins in round 3
    run(strategy, grid, 2)
    assert strategy.identities[777].client_id == "c0"
    to_late = [
        m
        for m in grid.sent
        if m.metadata.dst_node_id == 777 and m.metadata.message_type == MessageType.TRAIN
    ]
    assert [p.MERGED in m.content.array_records for m in to_late] == [False, True]
    assert sorted(train(records, 4)["clients"]) == ["c0", "m0", "m1"]


def test_leaver_is_logged_and_its_packet_ages_out(caplog):
    grid, strategy, records = make(max_packet_age=2)
    run(strategy, grid, 2)
    del grid.nodes[grid.node_of("c0")]  # leaves for good
    with caplog.at_level(logging.INFO):
        run(strategy, grid, 3)  # does not wait for the missing node
    assert "clients not connected: ['c0']" in caplog.text
    assert train(records, 3)["absent"] == ["c0"]
    # c0's last packet (round 2) stays a source while it is at most 2 rounds old
    assert [train(records, r)["server"]["bank"] for r in (3, 4, 5)] == [3, 3, 2]
    assert sorted(strategy.bank) == ["m0", "m1"]  # forgotten once older than 2 rounds


def test_an_error_reply_is_logged_on_one_line_with_its_cause():
    from mergenet_fl.flower.base import error_cause

    wrapped = (
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException "
        "ClientAppException occurred. Message: disk on fire\n  at round 3'>"
    )
    assert error_cause(wrapped) == "disk on fire at round 3"
    assert error_cause("node went away") == "node went away"
