"""Benchmark what a round costs beyond its training: one JSON object per scenario.

    python -m simulations.bench_rounds                        # every scenario
    python -m simulations.bench_rounds --scenarios paper --rounds 100

Scenarios, each in a fresh process on Flower's simulation engine (one CPU per client):

- ``default``: the default federation as ``bash scripts/quickstart.sh`` runs it.
- ``paper``: two image clients (``federation=paper``) in the paper's time unit,
  ``local_steps=4``, evaluated every 10 rounds.
- ``paper-local``: the same run with LocalOnly, whose server does nothing: what the app and
  Flower cost a round before any method's work.
- ``flower-floor``: the same two nodes and stage schedule, with clients that answer at once
  and a minimal Message-API strategy that pulls replies as the app's do: Flower's own cost
  per round.

``wall_s`` spans rounds 2 to N (from the end of round 1 to the last reply: round 1 carries
the start of Ray's worker processes, which import torch and build their clients on their first
message), ``compute_s`` sums over those rounds' stages the slowest client's training or
evaluation time (the critical path; evaluation includes re-estimating BatchNorm), and
``compute_fraction = compute_s / wall_s``; ``server_per_round_s`` is the server's own work
in those stages (configure and aggregate) per round; ``rounds`` counts the rounds measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.simulation import run_simulation

from mergenet_fl.flower.polling import PromptGrid

SCENARIOS = ("default", "paper", "paper-local", "flower-floor")
PAPER = ["federation=paper", "local_steps=4", "evaluate_every=10"]
OVERRIDES = {"default": [], "paper": PAPER, "paper-local": [*PAPER, "strategy=local"]}


def run_scenario(name: str, rounds: int | None) -> dict[str, float | str | int]:
    """Run one scenario in this process and measure it."""
    if name == "flower-floor":
        return _floor(rounds or 60)
    from mergenet_fl.flower.runlog import read_lines
    from simulations.config import compose
    from simulations.run import simulate

    overrides = ["checkpoint=false", *OVERRIDES[name]]
    if rounds or name != "default":  # the default federation keeps its own round count
        overrides.append(f"num_rounds={rounds or 60}")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(overrides + [f"output_dir={tmp}"])
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        simulate(cfg, run_dir)
        wall, compute, server = measure(read_lines(run_dir))
    return _result(name, cfg.num_rounds - 1, cfg.num_clients, wall, compute, server)


def measure(lines: list[dict]) -> tuple[float, float, float]:
    """``(wall_s, compute_s, server_s)`` of rounds 2 onwards of a run's ``metrics.jsonl``
    lines: from the end of round 1 to the end of the last stage; per stage the slowest client's
    training or evaluation seconds, summed; the server's configure and aggregate seconds."""
    spans = [(line["round"], line["server"]) for line in lines if "server" in line]
    warm = max(span["stage_end"] for rnd, span in spans if rnd == 1)
    wall = max(span["stage_end"] for _, span in spans) - warm
    server = sum(
        span.get("configure_seconds", 0.0) + span.get("aggregate_seconds", 0.0)
        for rnd, span in spans
        if rnd > 1
    )
    stages: dict[tuple[int, str], float] = defaultdict(float)
    for line in lines:
        if "group" in line and "dropped" not in line and line["round"] > 1:
            seconds = line.get("train_seconds", line.get("eval_seconds", 0.0))
            key = (line["round"], line["stage"])
            stages[key] = max(stages[key], seconds)
    return wall, sum(stages.values()), server


def _result(
    name: str, rounds: int, clients: int, wall: float, compute: float, server: float
) -> dict:
    return {
        "scenario": name,
        "rounds": rounds,
        "clients": clients,
        "wall_s": round(wall, 3),
        "compute_s": round(compute, 3),
        "compute_fraction": round(compute / wall, 4) if wall > 0 else 0.0,
        "overhead_per_round_s": round((wall - compute) / rounds, 4),
        "server_per_round_s": round(server / rounds, 4),
    }


class _Floor(Strategy):
    """Sends an empty message to every node and ignores the replies; times the rounds."""

    def __init__(self, evaluate_every: int, num_rounds: int) -> None:
        self.evaluate_every, self.num_rounds = evaluate_every, num_rounds
        self.ends: dict[int, float] = {}  # round -> end of its last stage

    def _messages(self, grid: Grid, kind: str) -> list[Message]:
        while len(nodes := list(grid.get_node_ids())) < 2:
            time.sleep(0.1)
        return [Message(RecordDict({"config": ConfigRecord()}), nid, kind) for nid in nodes]

    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return self._messages(grid, "train")

    def aggregate_train(self, server_round, replies):
        list(replies)
        self.ends[server_round] = time.time()
        return None, None

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        if server_round % self.evaluate_every and server_round != self.num_rounds:
            return []
        return self._messages(grid, "evaluate")

    def aggregate_evaluate(self, server_round, replies):
        list(replies)
        self.ends[server_round] = time.time()
        return None

    def summary(self) -> None:
        pass


def _floor(rounds: int) -> dict:
    strategy = _Floor(evaluate_every=10, num_rounds=rounds)
    server, client = ServerApp(), ClientApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        # replies pulled as the app's strategies pull them (Flower's own 0.1 s: the same floor)
        strategy.start(grid=PromptGrid(grid), initial_arrays=ArrayRecord(), num_rounds=rounds)

    def answer(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    client.train()(answer)
    client.evaluate()(answer)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    wall = strategy.ends[rounds] - strategy.ends[1]
    return _result("flower-floor", rounds - 1, 2, wall, 0.0, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--rounds", type=int, help="rounds of every scenario (default: each one's)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one scenario in this process
    args = parser.parse_args()
    if args.one:
        print("BENCH " + json.dumps(run_scenario(args.one, args.rounds)), flush=True)
        return
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    for name in args.scenarios.split(","):
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; choose from {SCENARIOS}")
        cmd = [sys.executable, "-m", "simulations.bench_rounds", "--one", name]
        cmd += ["--rounds", str(args.rounds)] if args.rounds else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        found = [x for x in proc.stdout.splitlines() if x.startswith("BENCH ")]
        if proc.returncode != 0 or not found:
            sys.exit(f"scenario {name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        print(found[-1][len("BENCH ") :], flush=True)


if __name__ == "__main__":
    main()
