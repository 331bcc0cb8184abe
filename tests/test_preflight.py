"""Fail fast: a broken federation stops before anything starts, with every problem listed."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulations.config import compose
from simulations.preflight import problems

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def run(tmp_path: Path, *overrides: str, env: dict | None = None) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "simulations.run", f"output_dir={tmp_path}", *overrides]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env or ENV, capture_output=True, text=True, timeout=120
    )
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


@pytest.mark.slow
def test_unknown_architecture_stops_the_run_before_it_starts(tmp_path):
    code, out, seconds = run(tmp_path, "federation=tiny", "federation.clients.0.arch=resnet9")
    assert code != 0 and seconds < 60
    assert "unknown arch 'resnet9'" in out and "federation.clients[0] (resnet8-images)" in out
    assert "Starting" not in out and "ROUND" not in out  # no strategy, no round
    assert not list(tmp_path.iterdir())  # no results folder left behind
    assert out.count("Traceback") == 0


@pytest.mark.slow
def test_missing_data_file_stops_the_run_naming_the_file(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    out_dir = tmp_path / "out"
    code, out, seconds = run(out_dir, env={**ENV, "MERGENET_DATA_DIR": str(empty)})
    assert code != 0 and seconds < 60
    assert "missing data file" in out and "cifar10_train_jpeg.npz" in out and "sst2" in out
    assert not out_dir.exists() or not list(out_dir.iterdir())


def test_every_problem_of_a_federation_is_listed_at_once(tmp_path):
    cfg = compose(
        [
            "federation=tiny",
            "federation.clients.0.layers=[nothing]",
            "federation.clients.1.layers=[features.1.conv.0.0]",  # a depthwise convolution
            "federation.clients.2.dataset=cifar11",
            f"resume={tmp_path}",
        ]
    )
    found = problems(cfg)
    assert len(found) == 4, found
    assert "matches no module" in found[0]
    assert "grouped/depthwise" in found[1]
    assert "unknown dataset 'cifar11'" in found[2]
    assert "no checkpoint (server.ckpt)" in found[3]


def test_a_task_that_does_not_fit_the_model_is_named():
    cfg = compose(["federation=tiny", "federation.clients.2.dataset=synthetic-images"])
    (problem,) = problems(cfg)
    assert "bert_tiny" in problem and "needs image_classification" in problem


def test_altered_data_file_is_named(tmp_path):
    data = tmp_path / "data"
    (data / "bert-base-uncased").mkdir(parents=True)
    (data / "bert-base-uncased" / "vocab.txt").write_text("[PAD]\n")
    cfg = compose(["federation=tiny", "federation.clients.2.dataset=sst2", f"data_dir={data}"])
    found = problems(cfg)
    assert any("checksum mismatch" in p and "vocab.txt" in p for p in found)
    assert any("missing data file" in p and "sst2/train.tsv" in p for p in found)
