"""What a run leaves on disk: per-round, per-client JSON lines, a summary table and plots.

``<run dir>/metrics.jsonl``  one line per (round, stage, client), plus dropped clients
``<run dir>/summary.md``     final metrics per architecture group, bytes, wall time
``<run dir>/accuracy.png``   accuracy (or F1) per round per group
``<run dir>/bytes.png``      bytes sent and received per round
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt

matplotlib.use("Agg")  # files only, no display

log = logging.getLogger(__name__)

SCORE_KEYS = ("accuracy", "f1", "em")  # the first one a group reports is its score


def new_run_dir(root: str | os.PathLike, name: str) -> Path:
    """A fresh ``root/<timestamp>-<name>`` folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root).expanduser().resolve() / f"{stamp}-{name}"
    suffix = 1
    while path.exists():
        path = path.with_name(f"{stamp}-{name}-{suffix}")
        suffix += 1
    path.mkdir(parents=True)
    return path


class RunRecorder:
    """The strategies' ``on_round`` sink: appends JSON lines as rounds finish."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.started = time.perf_counter()

    def __call__(self, record: dict[str, Any]) -> None:
        head = {"round": record["round"], "stage": record["stage"]}
        lines = [
            {**head, "client": cid, "seconds": round(time.perf_counter() - self.started, 3), **v}
            for cid, v in sorted(record["clients"].items())
        ]
        lines += [{**head, "client": c, "dropped": r} for c, r in sorted(record["dropped"].items())]
        for key in ("absent", "server"):
            if record.get(key):
                lines.append({**head, key: record[key]})
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)

    def drop_after(self, last_round: int) -> None:
        """Forget lines of rounds after ``last_round`` (an interrupted run being resumed)."""
        kept = [line for line in read_lines(self.run_dir) if line["round"] <= last_round]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(line) + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)


def read_lines(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def group_curves(
    lines: list[dict[str, Any]], metric: str | None = None
) -> dict[str, dict[int, float]]:
    """Group -> round -> example-weighted evaluation score.

    The score is ``metric`` where given (groups without it are left out), else the first of
    :data:`SCORE_KEYS` that a group reports.
    """
    sums: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))
    for line in lines:
        if line.get("stage") != "evaluate" or "group" not in line:
            continue
        if metric is not None:
            key = metric if metric in line else None
        else:
            key = next((k for k in SCORE_KEYS if k in line), None)
        if key is None:
            continue
        n = max(line.get("num-examples", 1.0), 1.0)
        acc = sums[line["group"]][line["round"]]
        acc[0] += line[key] * n
        acc[1] += n
    return {g: {r: s / n for r, (s, n) in sorted(rounds.items())} for g, rounds in sums.items()}


def bytes_per_round(lines: list[dict[str, Any]]) -> dict[int, tuple[int, int]]:
    """Round -> (bytes down, bytes up) over all clients, train stage."""
    out: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for line in lines:
        if line.get("stage") == "train" and "bytes_down" in line:
            out[line["round"]][0] += int(line["bytes_down"])
            out[line["round"]][1] += int(line["bytes_up"])
    return {r: (d, u) for r, (d, u) in sorted(out.items())}


def summarize(run_dir: Path, title: str, seconds: float, groups: Sequence[str] = ()) -> Path:
    """Write ``summary.md`` and the plots; return the summary's path."""
    lines = read_lines(run_dir)
    curves = group_curves(lines)
    traffic = bytes_per_round(lines)
    last = {}
    for line in lines:
        if line.get("stage") == "evaluate" and "group" in line:
            last.setdefault(line["group"], {})[line["client"]] = line
    rows = ["| group | clients | score | final | loss |", "|---|---:|---|---:|---:|"]
    for group in sorted(last):
        members = list(last[group].values())
        key = next((k for k in SCORE_KEYS if k in members[0]), None)
        score = curves.get(group, {})
        final = f"{list(score.values())[-1]:.4f}" if score else "n/a"
        losses = [m["loss"] for m in members if "loss" in m]
        loss = f"{sum(losses) / len(losses):.4f}" if losses else "n/a"
        rows.append(f"| {group} | {len(members)} | {key or 'n/a'} | {final} | {loss} |")
    total_down = sum(d for d, _ in traffic.values())
    total_up = sum(u for _, u in traffic.values())
    dropped = [line for line in lines if "dropped" in line]
    text = "\n".join(
        [
            f"# {title}",
            "",
            f"Wall time: {seconds:.1f} s. Rounds: {max(traffic, default=0)}.",
            f"Bytes: {total_down:,} down, {total_up:,} up (all clients, all rounds).",
            f"Dropped replies: {len(dropped)}.",
            "",
            "Final evaluation per architecture group (example-weighted):",
            "",
            *rows,
            "",
            "Plots: `accuracy.png` (score per round per group), `bytes.png` (bytes per round).",
            "Per-round, per-client numbers: `metrics.jsonl`.",
            "",
        ]
    )
    (run_dir / "summary.md").write_text(text, encoding="utf-8")
    _plot_curves(curves, run_dir / "accuracy.png", title)
    _plot_bytes(traffic, run_dir / "bytes.png", title)
    return run_dir / "summary.md"


def _plot_curves(curves: dict[str, dict[int, float]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for group, points in sorted(curves.items()):
        ax.plot(list(points), list(points.values()), marker="o", label=group)
    ax.set(xlabel="round", ylabel="accuracy / F1", title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if curves:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_bytes(traffic: dict[int, tuple[int, int]], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = list(traffic)
    ax.bar(
        [r - 0.2 for r in rounds],
        [d for d, _ in traffic.values()],
        width=0.4,
        label="server → clients",
    )
    ax.bar(
        [r + 0.2 for r in rounds],
        [u for _, u in traffic.values()],
        width=0.4,
        label="clients → server",
    )
    ax.set(xlabel="round", ylabel="bytes", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def check(run_dir: Path) -> int:
    """0 if the run in ``run_dir`` ended normally, else 1 (with the reason on stderr)."""
    run_file = run_dir / "run.json"
    if not run_file.exists():
        print(f"{run_dir}: no run.json, the run did not finish", file=sys.stderr)
        return 1
    run = json.loads(run_file.read_text(encoding="utf-8"))
    if run.get("status") == "failed":
        print(f"{run_dir}: the run failed: {run.get('failed')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # python -m simulations.results check <run dir>
    if len(sys.argv) != 3 or sys.argv[1] != "check":
        sys.exit("usage: python -m simulations.results check <run dir>")
    sys.exit(check(Path(sys.argv[2])))
