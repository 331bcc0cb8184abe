"""A group pre-trained on its own rows before round 1 (cached on disk), and a frozen group that
never trains in a round: the paper's frozen, pre-trained source (federation=hub_frozen)."""

import json

import pytest
import torch

from harness import FakeGrid, app_nodes, set_task_identity
from simulations import federation
from simulations.cache import KeyedCache
from simulations.client_app import make_client_app
from simulations.config import ConfigError, compose
from simulations.server_app import run_server
from simulations.tasks import ImageClassificationTask

TINY = ["federation=tiny_htfe", "federation.clients.1.arch=convnet5"]
TINY += ["federation.examples_per_client=32", "federation.test_examples=32"]


def fresh_caches(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(federation, "_WORKLOADS", KeyedCache("workloads"))
    monkeypatch.setattr(federation, "_PRETRAINED", KeyedCache("pretrained", lambda: tmp_path))


def test_a_pretrained_group_starts_from_its_trained_model_which_is_cached(monkeypatch, tmp_path):
    fresh_caches(monkeypatch, tmp_path)
    plain = federation.build_workload(compose(TINY), 0)
    cfg = compose([*TINY, "+federation.clients.0.pretrain_epochs=2"])
    trained = federation.build_workload(cfg, 0)
    before, after = plain.model.state_dict(), trained.model.state_dict()
    assert not torch.equal(before["fc.weight"], after["fc.weight"])  # it trained
    trained.reset_model()  # a reset goes back to the pre-trained weights, not the init
    assert torch.equal(trained.model.state_dict()["fc.weight"], after["fc.weight"])
    assert list((tmp_path / "pretrained").iterdir())
    # another process: from disk, no training
    monkeypatch.setattr(federation, "_WORKLOADS", KeyedCache("workloads"))
    monkeypatch.setattr(ImageClassificationTask, "train", pytest.fail)
    again = federation.build_workload(cfg, 0)
    assert torch.equal(again.model.state_dict()["fc.weight"], after["fc.weight"])
    assert federation.build_workload(cfg, 1).model is not again.model  # the other group: plain


def test_a_frozen_client_never_trains_and_still_sends_its_knowledge(monkeypatch, tmp_path):
    set_task_identity()
    fresh_caches(monkeypatch, tmp_path)
    cfg = compose(
        [*TINY, "+federation.clients.1.frozen=true", "+federation.clients.1.send_only=true"]
        + ["num_rounds=3", "local_steps=2", "evaluate_every=3", "strategy.share=none"]
    )
    out = tmp_path / "out"
    out.mkdir()
    run_server(FakeGrid(app_nodes(make_client_app(lambda context: cfg), 2)), cfg, out)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    trained = [x for x in rows if x.get("stage") == "train" and x.get("group") == "resnet18-images"]
    assert trained and all(x["train_steps"] == 0 for x in trained)
    moving = [x for x in rows if x.get("stage") == "train" and x.get("group") == "cnn4-images"]
    assert all(x["train_steps"] == 2 for x in moving)
    server = [x["server"] for x in rows if "server" in x and x["stage"] == "train"]
    assert server[-1]["bank"] == 2  # the frozen client's packet is a source
    assert server[-1]["pieces"] == 1.0  # only the other client was a target


def test_pretrain_epochs_and_frozen_are_checked():
    with pytest.raises(ConfigError, match="pretrain_epochs must be an integer >= 0"):
        compose([*TINY, "+federation.clients.0.pretrain_epochs=-1"])
    with pytest.raises(ConfigError, match="frozen must be true or false"):
        compose([*TINY, "+federation.clients.0.frozen=maybe"])


def test_the_frozen_hub_is_a_pretrained_send_only_source():
    hub = compose("federation=hub_frozen").clients[0]
    assert hub.frozen and hub.send_only and hub.pretrain_epochs == 15 and hub.partition == "iid"


def test_a_frozen_client_keeps_its_model_while_its_methods_shared_model_learns(
    monkeypatch, tmp_path
):
    set_task_identity()
    fresh_caches(monkeypatch, tmp_path)
    cfg = compose(
        [*TINY, "+federation.clients.1.frozen=true", "+federation.clients.1.local_steps=3"]
        + ["strategy=fml", "num_rounds=2", "local_steps=2", "evaluate_every=2"]
    )
    hub = federation.build_workload(cfg, 1).model  # the one the client app trains (cached)
    before = {k: v.clone() for k, v in hub.state_dict().items()}
    out = tmp_path / "out"
    out.mkdir()
    run_server(FakeGrid(app_nodes(make_client_app(lambda context: cfg), 2)), cfg, out)
    after = hub.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics too
    assert all(p.requires_grad for p in hub.parameters())  # as it was
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if x.get("stage") == "train" and "client" in x]
    frozen = [x for x in train if x["group"] == "resnet18-images"]
    assert [x["train_steps"] for x in frozen] == [3, 3]  # its shared model, at the group's steps
    assert all(x["train_loss"] > 0 for x in frozen)
    assert all(x["train_steps"] == 2 for x in train if x["group"] == "cnn4-images")


def test_local_steps_of_a_group_are_checked():
    with pytest.raises(ConfigError, match="local_steps must be null or an integer >= 1"):
        compose([*TINY, "+federation.clients.0.local_steps=0"])
