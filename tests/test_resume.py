"""Checkpoint and resume: a killed simulation continues from its last checkpoint and ends with
the same metrics as an uninterrupted run; two runs with one seed give the same metrics."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import FakeGrid, app_nodes, set_task_identity
from simulations.client_app import make_client_app
from simulations.config import compose
from simulations.server_app import run_server

pytestmark = [pytest.mark.resume, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
ARGS = ["federation=tiny", "num_rounds=4", "checkpoint=true"]


def simulate(*overrides: str, wait: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "simulations.run", *ARGS, *overrides]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: Ray's workers go with it
    )
    if wait:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
    return proc


def final_metrics(run_dir: Path) -> dict:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        (x["round"], x["stage"], x["client"]): {
            k: v  # but timings and wall-clock stamps, which no two runs share
            for k, v in x.items()
            if not k.endswith(("seconds", "_at"))
        }
        for x in lines
        if "client" in x
    }


def only_run(root: Path) -> Path:
    (run_dir,) = [d for d in root.iterdir() if (d / "metrics.jsonl").exists()]
    return run_dir


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    simulate(f"output_dir={tmp_path / 'whole'}")
    whole = final_metrics(only_run(tmp_path / "whole"))

    proc = simulate(f"output_dir={tmp_path / 'cut'}", wait=False)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            ckpts = list((tmp_path / "cut").glob("*/server.ckpt"))
            if ckpts and torch.load(ckpts[0], weights_only=False)["round"] >= 2:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint of round 2 appeared")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run_dir = ckpts[0].parent
    saved = torch.load(run_dir / "server.ckpt", weights_only=False)["round"]
    assert 2 <= saved < 4
    simulate(f"resume={run_dir}")
    resumed = final_metrics(run_dir)
    assert resumed.keys() == whole.keys()
    for key in whole:
        assert resumed[key] == whole[key], key


def test_same_seed_same_metrics(tmp_path):
    """The real ServerApp and ClientApp code, in process (the resume test covers Ray)."""
    set_task_identity()
    cfg = compose("federation=tiny num_rounds=2")
    runs = []
    for name in ("a", "b", "b"):  # the second run in "b" replaces the first one's results
        (tmp_path / name).mkdir(exist_ok=True)
        grid = FakeGrid(app_nodes(make_client_app(lambda context: cfg), cfg.num_clients))
        runs.append(final_metrics(run_server(grid, cfg, tmp_path / name)))
    assert runs[0] == runs[1] == runs[2] and len(runs[0]) == 12
    lines = [
        (d / "metrics.jsonl").read_text().count("\n") for d in (tmp_path / "a", tmp_path / "b")
    ]
    assert lines[0] == lines[1]
