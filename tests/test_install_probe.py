"""probe_install: each round, a client's scores just before and just after it installs what
the server sent, before it trains: what the server's part alone does to the client."""

import json

import pytest

from harness import FakeGrid, app_nodes, set_task_identity
from simulations import federation
from simulations.cache import KeyedCache
from simulations.client_app import make_client_app
from simulations.config import ConfigError, compose
from simulations.server_app import run_server

TINY = ["federation=tiny_htfe", "federation.clients.1.arch=convnet5", "eval_split=local"]
TINY += ["federation.examples_per_client=32", "federation.test_examples=32", "num_rounds=3"]
TINY += ["local_steps=2", "evaluate_every=3", "probe_install=true"]


def train_replies(monkeypatch, tmp_path, *overrides: str) -> list[dict]:
    set_task_identity()
    monkeypatch.setattr(federation, "_WORKLOADS", KeyedCache("workloads"))
    cfg = compose([*TINY, *overrides])
    out = tmp_path / "out"
    out.mkdir()
    run_server(FakeGrid(app_nodes(make_client_app(lambda context: cfg), 2)), cfg, out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in rows if x.get("stage") == "train" and "client" in x]


def test_a_client_that_installs_nothing_scores_the_same_before_and_after(monkeypatch, tmp_path):
    replies = train_replies(monkeypatch, tmp_path, "strategy=local")
    assert len(replies) == 6
    assert all(x["install_gain"] == 0.0 and x["install_gain_global"] == 0.0 for x in replies)


def test_an_installed_head_shows_in_the_probe(monkeypatch, tmp_path):
    replies = train_replies(monkeypatch, tmp_path, "strategy=lgfedavg")
    later = [x for x in replies if x["round"] >= 2]  # the average of both clients' heads
    assert later and any(x["install_gain"] != 0.0 for x in later)
    assert all(-1.0 <= x["install_gain_global"] <= 1.0 for x in replies)


def test_probe_install_must_be_a_boolean():
    with pytest.raises(ConfigError, match="probe_install must be true or false"):
        compose(["federation=tiny_htfe", "probe_install=2"])
