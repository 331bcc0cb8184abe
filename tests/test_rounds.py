"""Rounds that cost what their training costs: cached client data, evaluation schedule,
waiting for nodes, and runs whose clients fail."""

import json
import logging
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType

from harness import FakeGrid, TinyClient, app_nodes, needs_real_data, set_task_identity
from mergenet_fl.flower import LocalOnly
from mergenet_fl.flower.base import NotEnoughNodes
from simulations import federation
from simulations.cache import KeyedCache, file_digest
from simulations.client_app import make_client_app
from simulations.config import compose
from simulations.server_app import RunFailed, run_server


@pytest.fixture(autouse=True)
def _task_identity():
    set_task_identity()


def test_keyed_cache_builds_once_then_serves_memory_and_disk(tmp_path, caplog):
    built = []

    def build():
        built.append(1)
        return {"rows": torch.arange(5)}

    cache = KeyedCache("things", lambda: tmp_path)
    first = cache.get({"a": 1}, build)
    assert cache.get({"a": 1}, build) is first and len(built) == 1
    other_process = KeyedCache("things", lambda: tmp_path)  # memory empty, disk warm
    assert torch.equal(other_process.get({"a": 1}, build)["rows"], first["rows"])
    assert len(built) == 1
    other_process.get({"a": 2}, build)  # other key parts: built again
    assert len(built) == 2
    for path in (tmp_path / "things").iterdir():
        path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        KeyedCache("things", lambda: tmp_path).get({"a": 1}, build)
    assert len(built) == 3 and "ignoring cache entry" in caplog.text
    files = sorted((tmp_path / "things").iterdir())
    memory_only = KeyedCache("things", lambda: tmp_path)
    kept = memory_only.get({"a": 3}, build, disk=False)
    assert memory_only.get({"a": 3}, build, disk=False) is kept and len(built) == 4
    assert sorted((tmp_path / "things").iterdir()) == files  # nothing written
    KeyedCache("things", lambda: tmp_path).get({"a": 1}, build, disk=False)  # nor read
    assert len(built) == 5


def test_a_changed_data_file_or_config_changes_the_key(tmp_path, monkeypatch):
    data_file = tmp_path / "train.tsv"
    data_file.write_text("a\t1\n")
    monkeypatch.setattr(federation.D, "dataset_files", lambda name, data_dir: [data_file])
    cfg = compose("federation=tiny")
    images = cfg.clients[0]  # resnet8-images, on synthetic-images
    before = federation._data_parts(cfg, images, 0)
    assert before == federation._data_parts(cfg, images, 0)
    time.sleep(0.01)
    data_file.write_text("a\t0\n")
    digest = file_digest(data_file)
    after = federation._data_parts(cfg, images, 0)
    assert after != before and digest in after["files"].values()
    other = compose("federation=tiny federation.alpha=0.3")
    assert federation._data_parts(other, other.clients[0], 0) != after
    assert federation._data_parts(cfg, images, 1) != after


def test_a_workload_is_built_once_per_process():
    cfg = compose("federation=tiny")
    first = federation.build_workload(cfg, 0)
    assert federation.build_workload(cfg, 0) is first
    assert federation.build_workload(compose("federation=tiny seed=1"), 0) is not first


@pytest.mark.slow
@needs_real_data
def test_partitions_are_disjoint_with_the_cache_on_and_survive_a_new_process(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGENET_CACHE_DIR", str(tmp_path))
    cfg = compose("federation=study federation.examples_per_client=64")
    rows = [federation.build_workload(cfg, pid).data.train_rows for pid in range(4)]
    assert all(len(r) == 64 for r in rows)
    assert len(np.unique(np.concatenate(rows))) == 4 * 64
    assert list((tmp_path / "client-data").iterdir())
    monkeypatch.setattr(federation, "_DATA", KeyedCache("client-data", lambda: tmp_path))
    monkeypatch.setattr(federation, "_WORKLOADS", KeyedCache("workloads"))
    again = federation.build_workload(cfg, 2).data
    assert np.array_equal(again.train_rows, rows[2])
    first = federation._DATA.get(federation._data_parts(cfg, *cfg.client(2)), pytest.fail)
    assert torch.equal(first.train_set.images, again.train_set.images)


def clients():
    return [TinyClient(f"m{i}", "mlp", i) for i in range(3)]


def test_evaluation_every_k_rounds_and_always_at_the_last():
    records = []
    strategy = LocalOnly(evaluate_every=2, on_round=records.append)
    grid = FakeGrid(clients())
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=5, timeout=5)
    evaluated = sorted({r["round"] for r in records if r["stage"] == "evaluate"})
    assert evaluated == [2, 4, 5]
    assert [r["round"] for r in records if r["stage"] == "train"] == [1, 2, 3, 4, 5]
    kinds = [m.metadata.message_type for m in grid.sent]
    assert kinds.count(MessageType.EVALUATE) == 3 * 3
    assert all(not r["dropped"] for r in records)


def test_too_few_nodes_stop_the_run_instead_of_waiting_for_ever():
    strategy = LocalOnly(min_available_nodes=4, node_wait=0.5)
    start = time.perf_counter()
    with pytest.raises(NotEnoughNodes, match="3 of the 4 nodes"):
        strategy.start(grid=FakeGrid(clients()), initial_arrays=ArrayRecord(), num_rounds=1)
    assert time.perf_counter() - start < 5


def failing_node(handler, kind=MessageType.TRAIN):
    def node(msg: Message) -> Message:
        if msg.metadata.message_type == kind:
            raise RuntimeError("disk on fire")
        return handler(msg)

    return node


def test_a_client_that_fails_every_round_fails_the_run_and_is_named(tmp_path):
    cfg = compose("federation=tiny num_rounds=2 strategy=local")
    nodes = app_nodes(make_client_app(lambda context: cfg), cfg.num_clients)
    nodes[1] = failing_node(nodes[1])
    with pytest.raises(RunFailed, match="client-1: error reply: RuntimeError: disk on fire"):
        run_server(FakeGrid(nodes), cfg, tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "mbv2-images" in summary and "disk on fire" in summary
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "failed"


def test_failed_clients_can_be_allowed(tmp_path):
    cfg = compose("federation=tiny num_rounds=1 strategy=local allow_failed_clients=true")
    nodes = app_nodes(make_client_app(lambda context: cfg), cfg.num_clients)
    nodes[1] = failing_node(nodes[1])
    run_server(FakeGrid(nodes), cfg, tmp_path)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "ok"


def test_evaluation_seconds_count_the_batchnorm_re_estimation(tmp_path, monkeypatch):
    """Re-estimating BatchNorm is evaluation compute: the rounds benchmark must not count it
    as the round's overhead."""
    from simulations import client_app

    calibrate = client_app.calibrated_batchnorm

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return calibrate(*args, **kwargs)

    monkeypatch.setattr(client_app, "calibrated_batchnorm", slow)
    cfg = compose("federation=tiny num_rounds=1 strategy=local")
    run_server(
        FakeGrid(app_nodes(make_client_app(lambda context: cfg), cfg.num_clients)), cfg, tmp_path
    )
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluated = [x for x in lines if x.get("stage") == "evaluate" and "group" in x]
    assert len(evaluated) == cfg.num_clients
    assert all(x["eval_seconds"] >= 0.3 for x in evaluated)
    assert all(x["client_seconds"] >= x["eval_seconds"] for x in evaluated)


def test_the_client_app_travels_as_its_recipe_and_runs_after_the_trip(tmp_path):
    """Flower's simulation pickles the ClientApp with every message it sends to a Ray actor:
    it goes as ``make_client_app(config_for)``, not as its handlers' code."""
    import pickle

    from ray import cloudpickle

    from simulations.client_app import FixedConfig

    set_task_identity()
    cfg = compose("federation=tiny num_rounds=1 strategy=local")
    data = cloudpickle.dumps(make_client_app(FixedConfig(cfg)))
    assert len(data) < 2 * len(cloudpickle.dumps(FixedConfig(cfg)))  # no code, mostly config
    app = pickle.loads(data)
    run_server(FakeGrid(app_nodes(app, cfg.num_clients)), cfg, tmp_path)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "ok"


def test_a_process_reloads_a_client_only_when_another_process_wrote_its_state():
    from flwr.app import ConfigRecord, Context, RecordDict

    from mergenet_fl.flower import client as mc
    from simulations.client_app import TRAIN_STATE_KEY, save, sync

    work = federation.build_workload(compose("federation=tiny"), 0)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    sync(context, work)  # nothing saved yet: the initial weights
    assert torch.equal(work.model.fc.weight, work.initial_state["fc.weight"])
    with torch.no_grad():
        work.model.fc.weight += 1.0
    save(context, work)
    mine = work.synced
    sync(context, work)
    assert work.synced == mine  # this process wrote it: nothing to reload
    other = {k: v + 2.0 if k == "fc.weight" else v for k, v in work.initial_state.items()}
    work.model.load_state_dict(other)
    mc.save_local_model(context, work.model)  # another process trains and saves
    record = dict(context.state.config_records[TRAIN_STATE_KEY])
    context.state.config_records[TRAIN_STATE_KEY] = ConfigRecord({**record, "token": "theirs"})
    work.model.load_state_dict(work.initial_state)
    work.synced = mine  # this process still holds what it wrote, which is now stale
    sync(context, work)
    assert work.synced == "theirs" and torch.equal(work.model.fc.weight, other["fc.weight"])
