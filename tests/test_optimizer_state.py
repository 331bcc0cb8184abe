"""Optimiser state across rounds: fresh by default; kept, with no stale momentum on what the
server installed."""

import pytest
import torch
from flwr.app import Context, RecordDict

from harness import FakeGrid, app_nodes, set_task_identity
from simulations.client_app import (
    TRAIN_STATE_KEY,
    FixedConfig,
    _decode_train_state,
    make_client_app,
)
from simulations.config import ConfigError, compose
from simulations.server_app import run_server
from simulations.tasks import ImageClassificationTask, TrainState, get_task


def data(n: int = 32) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=gen)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())


def test_an_installed_parameter_starts_without_momentum_and_the_others_keep_theirs():
    task = get_task("image_classification")  # SGD, momentum 0.9
    run = dict(batch_size=32, seed=0, steps=1, lr=0.1)

    def trained_twice(installed: bool) -> torch.nn.Linear:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        state = TrainState()
        task.train(model, data(), state=state, **run)
        with torch.no_grad():
            model.weight.copy_(torch.full_like(model.weight, 0.5))  # the server installs it
        task.train(model, data(), state=state, installed=[model.weight] if installed else (), **run)
        return model

    def first_step_from(weight_value: float, bias: torch.Tensor) -> torch.nn.Linear:
        model = torch.nn.Linear(4, 2)
        with torch.no_grad():
            model.weight.fill_(weight_value)
            model.bias.copy_(bias)
        task.train(model, data(), state=TrainState(), **run)  # a fresh optimiser's step
        return model

    dropped, kept = trained_twice(True), trained_twice(False)
    # the bias was not installed: both runs carry its momentum alike
    assert torch.equal(dropped.bias, kept.bias)
    # the installed weight moved like a fresh optimiser's first step from 0.5, not further
    torch.manual_seed(0)
    first = torch.nn.Linear(4, 2)
    task.train(first, data(), state=TrainState(), **run)
    fresh = first_step_from(0.5, first.bias.detach().clone())
    assert torch.allclose(dropped.weight, fresh.weight, atol=1e-6)
    assert not torch.allclose(kept.weight, fresh.weight, atol=1e-4)  # stale momentum acted


def record_training(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    train = ImageClassificationTask.train

    def recording(self, model, dataset, **kwargs):
        state = kwargs["state"]
        names = {id(p): n for n, p in model.named_parameters()}
        calls.append(
            {
                "state": state.optimizer is not None,
                "installed": sorted(names.get(id(p), "?") for p in kwargs.get("installed", ())),
            }
        )
        return train(self, model, dataset, **kwargs)

    monkeypatch.setattr(ImageClassificationTask, "train", recording)
    return calls


@pytest.mark.parametrize("mode", ["fresh", "kept"])
def test_the_client_drops_momentum_of_what_the_group_average_replaced(tmp_path, mode, monkeypatch):
    set_task_identity()
    cfg = compose(
        ["federation=tiny_htfe", "federation.clients.0.count=2", "strategy=groupfedavg"]
        + ["federation.examples_per_client=32", "federation.test_examples=32"]
        + ["federation.clients.1.arch=convnet5"]  # cheaper than ResNet-18, one head shape too
        + ["num_rounds=2", "local_steps=2", "evaluate_every=2", f"optimizer_state={mode}"]
    )
    calls = record_training(monkeypatch)
    nodes = app_nodes(make_client_app(lambda context: cfg), cfg.num_clients)
    run_server(FakeGrid(nodes), cfg, tmp_path)
    assert len(calls) == 2 * cfg.num_clients
    first, second = calls[: cfg.num_clients], calls[cfg.num_clients :]
    assert not any(c["state"] for c in first)
    if mode == "fresh":
        assert not any(c["state"] or c["installed"] for c in second)
        return
    assert all(c["state"] for c in second)
    installed = sorted(c["installed"] for c in second)
    # the two cnn4 members received their group's mean: every parameter changed; the lone
    # convnet5's group mean is its own model: nothing was installed
    assert installed[0] == []
    assert (
        installed[1] == installed[2]
        and "fc.weight" in installed[1]
        and "conv1.weight" in installed[1]
    )


@pytest.mark.parametrize("mode", ["fresh", "kept"])
def test_only_a_kept_optimiser_state_stays_in_the_nodes_context(tmp_path, mode):
    """A fresh optimiser is dropped after its round: none of its momentum travels with the
    node's context (Flower's simulation ships that context with every message)."""
    set_task_identity()
    cfg = compose(
        ["federation=tiny_htfe", "federation.clients.1.arch=convnet5", "strategy=local"]
        + ["federation.examples_per_client=16", "federation.test_examples=16"]
        + ["num_rounds=1", "local_steps=1", "evaluate_every=1", f"optimizer_state={mode}"]
    )
    app = make_client_app(FixedConfig(cfg))
    contexts = [
        Context(
            run_id=1,
            node_id=pid,
            node_config={"partition-id": pid, "num-partitions": cfg.num_clients},
            state=RecordDict(),
            run_config={},
        )
        for pid in range(cfg.num_clients)
    ]
    run_server(FakeGrid([lambda msg, c=c: app(msg, c) for c in contexts]), cfg, tmp_path)
    for context in contexts:
        saved = _decode_train_state(dict(context.state.config_records[TRAIN_STATE_KEY]))
        assert (saved.optimizer is None) == (mode == "fresh")


def test_an_unknown_optimizer_state_is_refused():
    with pytest.raises(ConfigError, match="optimizer_state must be one of"):
        compose("optimizer_state=stale")


@pytest.mark.slow
def test_the_clients_learning_rate_follows_its_step_schedule(tmp_path, monkeypatch):
    set_task_identity()
    cfg = compose(
        ["federation=tiny_htfe", "federation.clients.1.arch=convnet5", "strategy=local"]
        + ["federation.examples_per_client=16", "federation.test_examples=16"]
        + ["num_rounds=4", "local_steps=1", "evaluate_every=4"]
        + ["lr_milestones=[1,3]", "lr_gamma=0.5", "client_optimizer.lr=0.08"]
    )
    assert [cfg.lr_factor(r) for r in range(1, 5)] == [1.0, 0.5, 0.5, 0.25]
    lrs: list[float] = []
    train = ImageClassificationTask.train

    def recording(self, model, dataset, **kwargs):
        lrs.append(kwargs["lr"])
        return train(self, model, dataset, **kwargs)

    monkeypatch.setattr(ImageClassificationTask, "train", recording)
    nodes = app_nodes(make_client_app(lambda context: cfg), cfg.num_clients)
    run_server(FakeGrid(nodes), cfg, tmp_path)
    assert lrs == pytest.approx([0.08] * 2 + [0.04] * 4 + [0.02] * 2)
    for bad in ("lr_milestones=[0]", "lr_gamma=1.5"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            compose(bad)
