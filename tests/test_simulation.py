"""End to end: the Flower simulation engine runs the apps on 3 heterogeneous clients."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_three_heterogeneous_clients_two_rounds(tmp_path):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "simulations.run",
        "federation=tiny",
        "num_rounds=2",
        f"output_dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = list(tmp_path.iterdir())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clients = [x for x in lines if "client" in x and "dropped" not in x]
    assert not [x for x in lines if "dropped" in x]
    for stage in ("train", "evaluate"):
        for rnd in (1, 2):
            rows = [x for x in clients if x["stage"] == stage and x["round"] == rnd]
            assert sorted(x["group"] for x in rows) == [
                "bert-text",
                "mbv2-images",
                "resnet8-images",
            ]
    round2 = [x for x in clients if x["stage"] == "train" and x["round"] == 2]
    assert all(x["bytes_down"] > 0 and x["bytes_up"] > 0 for x in round2)  # merged factors, pieces
    server = [x["server"] for x in lines if "server" in x and x["stage"] == "train"]
    assert server[1]["pieces"] == 3.0 and server[1]["transfer"] is True
    summary = (run_dir / "summary.md").read_text()
    assert "| resnet8-images | 1 | accuracy |" in summary
    assert (run_dir / "accuracy.png").stat().st_size > 0 and (
        run_dir / "bytes.png"
    ).stat().st_size > 0
    assert "results written to" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_ray_sends_a_context_of_up_to_one_mib_with_its_call():
    """A model of up to RAY_INLINE_BYTES travels inline (nothing in Ray's object store), a
    larger one through the store, with the init args `simulate` gives Flower's Ray backend."""
    import numpy as np
    import ray
    from ray._private.internal_api import memory_summary

    from simulations.config import compose
    from simulations.run import RAY_INLINE_BYTES, backend_config

    init_args = backend_config(compose(["federation=tiny"]))["init_args"]
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", **init_args)
    try:

        @ray.remote
        class Echo:
            def run(self, context: np.ndarray) -> np.ndarray:
                return context

        echo = Echo.remote()

        def stored_after_round_trip(nbytes: int) -> str:
            payload = np.ones(nbytes // 4, dtype=np.float32)
            assert ray.get(echo.run.remote(payload)).nbytes == nbytes
            return memory_summary(stats_only=True)

        assert " 0 objects" in stored_after_round_trip(RAY_INLINE_BYTES // 2)
        assert " 0 objects" not in stored_after_round_trip(2 * RAY_INLINE_BYTES)
    finally:
        ray.shutdown()
