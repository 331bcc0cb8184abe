"""Flower's ``start()`` arguments and result mean something in a heterogeneous federation, or
say at start why they do not: ``initial_arrays``, ``evaluate_fn``, ``Result.arrays``."""

import logging

import pytest
import torch
from flwr.app import ArrayRecord, MessageType, MetricRecord

from harness import RANK, FakeGrid, TinyClient, mlp, set_task_identity
from mergenet_fl.flower import GroupFedAvg, LocalOnly, MergeNet, group_state_dicts
from mergenet_fl.flower import client as mc
from mergenet_fl.flower import protocol as p


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def federation() -> FakeGrid:
    return FakeGrid(
        [
            TinyClient("m0", "mlp", 0),
            TinyClient("m1", "mlp", 1),
            TinyClient("c0", "cnn", 2),
            TinyClient("c1", "cnn", 3),
        ]
    )


def start(strategy, grid, rounds=2, initial=None, evaluate_fn=None):
    initial = ArrayRecord() if initial is None else initial
    return strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=rounds, timeout=10, evaluate_fn=evaluate_fn
    )


def trains(grid: FakeGrid) -> list:
    return [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]


def test_initial_arrays_start_every_model_they_fit_once(caplog):
    start_point = mlp(seed=99).state_dict()
    grid, strategy = federation(), LocalOnly(min_available_nodes=4)
    with caplog.at_level(logging.INFO, logger="mergenet_fl.flower"):
        start(strategy, grid, rounds=3, initial=ArrayRecord(start_point))
    first, later = trains(grid)[:4], trains(grid)[4:]
    assert all(p.INITIAL in m.content.array_records for m in first)
    assert not any(p.INITIAL in m.content.array_records for m in later)  # once per client
    # the mlp clients loaded them, the cnn clients (other parameters) did not
    by_client = {c: grid.nodes[grid.node_of(c)] for c in ("m0", "c0")}
    msg = next(m for m in first if m.metadata.dst_node_id == grid.node_of("m0"))
    model = mlp(seed=0)
    mc.receive(msg, model, by_client["m0"].layers, rank=RANK)
    assert all(torch.equal(v, start_point[k]) for k, v in model.state_dict().items())
    replies = [r for r in grid.replies if r.metadata.message_type == MessageType.TRAIN][:4]
    loaded = {
        p.ClientIdentity.from_content(r.content)[0].client_id: r.content.metric_records[p.METRICS][
            p.INITIAL_LOADED
        ]
        for r in replies
    }
    assert loaded == {"m0": 1.0, "m1": 1.0, "c0": 0.0, "c1": 0.0}
    assert "group 'mlp' starts from the initial arrays" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("do not fit group 'cnn'" in w for w in warnings) == 1  # said once


def test_a_resumed_server_does_not_send_initial_arrays_again():
    grid, strategy = federation(), GroupFedAvg(min_available_nodes=4)
    start(strategy, grid, rounds=1, initial=ArrayRecord(mlp(seed=99).state_dict()))
    resumed = GroupFedAvg(min_available_nodes=4)
    resumed.load_state_dict(strategy.state_dict())
    resumed.identities = dict(strategy.identities)
    grid.sent.clear()
    start(resumed, grid, rounds=1, initial=ArrayRecord(mlp(seed=99).state_dict()))
    assert trains(grid) and not any(p.INITIAL in m.content.array_records for m in trains(grid))


def test_evaluate_fn_runs_per_group_and_skips_a_group_it_cannot_evaluate(caplog):
    calls = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        calls.append(server_round)
        model = mlp(seed=0)
        model.load_state_dict(arrays.to_torch_state_dict())  # fails for the cnn group
        return MetricRecord({"norm": float(model[1].weight.norm())})

    grid, strategy = federation(), GroupFedAvg(min_available_nodes=4)
    with caplog.at_level(logging.WARNING, logger="mergenet_fl.flower"):
        result = start(
            strategy,
            grid,
            rounds=3,
            initial=ArrayRecord(mlp(seed=99).state_dict()),
            evaluate_fn=evaluate_fn,
        )
    assert set(result.evaluate_metrics_serverapp) == {0, 1, 2, 3}
    assert set(result.evaluate_metrics_serverapp[0]) == {"norm"}  # the initial arrays
    for rnd in (1, 2, 3):
        assert set(result.evaluate_metrics_serverapp[rnd]) == {"mlp/norm"}
    # round 0, then mlp every round; cnn once (it fails), then skipped
    assert calls == [0, 1, 1, 2, 3]
    assert sum("cannot evaluate group 'cnn'" in r.getMessage() for r in caplog.records) == 1


def test_evaluate_fn_without_group_models_is_warned_about_at_start(caplog):
    calls = []

    def evaluate_fn(server_round, arrays):
        calls.append(server_round)

    with caplog.at_level(logging.WARNING, logger="mergenet_fl.flower"):
        start(LocalOnly(min_available_nodes=4), federation(), rounds=2, evaluate_fn=evaluate_fn)
    assert "exists only with share='all' (here share='none')" in caplog.text
    assert calls == []  # no initial arrays to evaluate, no group models


def test_result_arrays_hold_each_groups_model():
    grid = federation()
    strategy = MergeNet(share="all", min_available_nodes=4)
    result = start(strategy, grid, rounds=2)
    models = group_state_dicts(result.arrays)
    assert set(models) == {"mlp", "cnn"}
    model = mlp(seed=0)
    model.load_state_dict(models["mlp"])  # a whole model: every parameter is there
    for key, value in strategy.group_arrays["mlp"].items():
        assert torch.equal(model.state_dict()[key], torch.from_numpy(value))


def test_result_arrays_are_empty_when_nothing_is_shared(caplog):
    with caplog.at_level(logging.INFO, logger="mergenet_fl.flower"):
        result = start(LocalOnly(min_available_nodes=4), federation(), rounds=2)
    assert len(result.arrays) == 0
    assert "each model stays on its client" in caplog.text
