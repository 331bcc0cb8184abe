"""The benchmarks run and report what they promise (numbers are not checked)."""

import json
import os
import subprocess
import sys

import pytest

from simulations.bench_server import run_one
from simulations.bench_train import idle_breakdown


def test_bench_reports_one_transfer_round():
    result = run_one(8, 4, "cpu", 0, 16, group_targets=True, update_rows=2)
    for key in ("clients", "groups", "rank", "seconds", "peak_mb", "bytes_per_client"):
        assert key in result
    assert (result["clients"], result["groups"], result["rank"]) == (8, 4, 4)
    assert result["group_targets"] is True and result["update_rows"] == 2
    # packet up, pieces up, merged down: 3·r·(m+n) numbers against 2·m·n for FedAvg
    expected = 3 * 4 * (768 + 768) / (2 * 768 * 768)
    assert result["ratio_by_group"]["bert_value"] == pytest.approx(expected, abs=1e-4)
    assert 0 < result["bytes_per_client"] < result["bytes_full"]


def test_rounds_benchmark_measures_the_critical_path():
    from simulations.bench_rounds import measure

    def span(rnd, stage, start, end, work=0.0):
        times = {"stage_start": start, "stage_end": end, "aggregate_seconds": work}
        return {"round": rnd, "stage": stage, "server": times}

    lines = [  # round 1 (the warm-up) is left out
        {"round": 1, "stage": "train", "client": "a", "group": "g", "train_seconds": 9.0},
        span(1, "train", 90.0, 100.0, work=7.0),
        {"round": 2, "stage": "train", "client": "a", "group": "g", "train_seconds": 2.0},
        {"round": 2, "stage": "train", "client": "b", "group": "h", "train_seconds": 3.0},
        {"round": 2, "stage": "train", "client": "c", "dropped": "no reply"},
        span(2, "train", 100.2, 104.0, work=0.25),
        {"round": 2, "stage": "evaluate", "client": "a", "group": "g", "eval_seconds": 0.5},
        span(2, "evaluate", 104.0, 105.0, work=0.5),
    ]
    wall, compute, server = measure(lines)
    assert wall == 5.0 and compute == 3.5  # the slowest client of each stage
    assert server == 0.75  # round 1's server work is left out with its wall time


@pytest.mark.slow
def test_flower_floor_scenario_prints_its_numbers():
    cmd = [sys.executable, "-m", "simulations.bench_rounds", "--scenarios", "flower-floor"]
    proc = subprocess.run([*cmd, "--rounds", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["scenario"] == "flower-floor" and result["rounds"] == 2
    assert result["compute_s"] == 0.0 and 0 < result["wall_s"] < 60


@pytest.mark.slow
def test_training_benchmark_prints_every_arch_batch_and_precision():
    cmd = [sys.executable, "-m", "simulations.bench_train", "--part", "steps", "--archs", "cnn4"]
    proc = subprocess.run(
        [*cmd, "--batch-sizes", "2", "4", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.strip().splitlines()]
    combos = {(x["batch_size"], x["precision"], x["channels_last"]) for x in lines}
    assert combos == {(b, p, c) for b in (2, 4) for p in ("fp32", "bf16") for c in (False, True)}
    assert all(x["arch"] == "cnn4" and x["images_per_s"] > 0 for x in lines)
    assert all(
        x["ms_per_step"] * x["images_per_s"] == pytest.approx(1000 * x["batch_size"], rel=0.01)
        for x in lines
    )
    assert {type(x["bf16_is_fast"]) for x in lines} == {bool}


@pytest.mark.slow
def test_training_benchmark_runs_the_federation_and_the_plain_loop_on_the_same_images():
    cmd = [sys.executable, "-m", "simulations.bench_train", "--part", "federation"]
    proc = subprocess.run(
        [*cmd, "--federation", "tiny_htfe", "--rounds", "2", "--repeats", "2"]
        + ["--examples-per-client", "64"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = [json.loads(x) for x in proc.stdout.strip().splitlines()]
    assert result["federation"] == "tiny_htfe" and result["clients"] == 2
    assert result["examples_per_client"] == 64  # instead of tiny_htfe's 128
    assert result["images"] == result["plain_images"] == 2 * 64  # round 2: one epoch each
    assert result["federation_images_per_s"] > 0 and result["plain_images_per_s"] > 0
    assert result["repeats"] == 2 and len(result["ratios"]) == 2
    assert result["ratio"] == pytest.approx(sum(result["ratios"]) / 2, abs=0.002)  # their median
    rounds = result["federation_rounds"]
    assert rounds["wall_ms"] > 0 and 0 <= rounds["idle"] < 1
    assert rounds["to_first_ms"] >= 0 and rounds["after_last_ms"] >= 0


def test_idle_breakdown_splits_a_stage_into_work_and_waits():
    stage = {"stage_start": 100.0, "stage_end": 102.0}
    replies = [  # two workers: one runs two messages, the other one
        {"client_seconds": 0.9, "started_at": 100.1, "ended_at": 101.0},
        {"client_seconds": 0.8, "started_at": 100.2, "ended_at": 101.0},
        {"client_seconds": 0.9, "started_at": 101.05, "ended_at": 101.95},
    ]
    out = idle_breakdown(stage, replies, workers=2)
    assert out["wall_ms"] == pytest.approx(2000)
    assert out["idle"] == pytest.approx(1 - 2.6 / 4)
    assert out["to_first_ms"] == pytest.approx(100) and out["after_last_ms"] == pytest.approx(50)


def test_training_benchmark_refuses_bad_arguments_before_any_work():
    for bad, error in (
        (["--rounds", "1"], "--rounds must be >= 2 and --repeats >= 1"),
        (["--repeats", "0"], "--rounds must be >= 2 and --repeats >= 1"),
        (["--examples-per-client", "0"], "--examples-per-client must be >= 1"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "simulations.bench_train", "--part", "federation", *bad],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and error in proc.stderr, bad
