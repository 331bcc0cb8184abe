"""Turn a study's runs into a report: mean ± std per group and method, gains, bytes, time.

Each run folder holds ``config.yaml``, ``metrics.jsonl`` and ``run.json`` (see
:mod:`simulations.results`). Runs are grouped by federation (its set of client groups) and by
method (strategy, adapter variant, transfer cycle); seeds are the repetitions.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from omegaconf import OmegaConf

from simulations.models import build_model
from simulations.results import SCORE_KEYS, bytes_per_round, group_curves, read_lines

matplotlib.use("Agg")  # files only, no display

NUM_CLASSES = {"cifar10": 10, "sst2": 2, "imdb": 2, "agnews": 4, "squad2": 2}
LOCAL, GROUP_FEDAVG = "LocalOnly", "GroupFedAvg"


@dataclass
class Run:
    """The numbers of one run."""

    federation: str
    method: str
    seed: int
    final: dict[str, float]  # group -> final evaluation score
    curves: dict[str, dict[int, float]]
    score_key: dict[str, str]
    bytes_per_round: float
    fedavg_bytes_per_round: float
    seconds: float
    overhead: float | None  # MergeNet's client-side time / local training time
    path: Path = field(repr=False, default=Path())


def method_label(cfg: dict) -> str:
    strategy = cfg["strategy"]["name"]
    if strategy == "local":
        return LOCAL
    if strategy == "groupfedavg":
        return GROUP_FEDAVG
    label = f"MergeNet ({cfg['adapter']['variant']}"
    if cfg["transfer_every"] != 1:
        label += f", every {cfg['transfer_every']} rounds"
    if cfg["strategy"].get("share", "none") == "none":
        label += ", transfer only"
    return label + ")"


def fedavg_bytes(cfg: dict) -> float:
    """Bytes one round of FedAvg on the full models would move (down and up, every client)."""
    total = 0
    for client in cfg["federation"]["clients"]:
        model = build_model(client["arch"], NUM_CLASSES.get(client["dataset"], 2))
        params = sum(p.numel() for p in model.parameters())
        total += 2 * 4 * params * client.get("count", 1)
    return float(total)


def load_run(path: Path, fedavg_cache: dict[str, float]) -> Run | None:
    if not (path / "run.json").exists():
        return None  # unfinished
    cfg = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
    lines = read_lines(path)
    curves = group_curves(lines)
    if not curves:
        return None
    score_key = {}
    for line in lines:
        if line.get("stage") == "evaluate" and "group" in line:
            score_key.setdefault(line["group"], next(k for k in SCORE_KEYS if k in line))
    traffic = bytes_per_round(lines)
    federation = " + ".join(sorted(curves))
    if federation not in fedavg_cache:
        fedavg_cache[federation] = fedavg_bytes(cfg)
    trains = [x for x in lines if x.get("stage") == "train" and "train_seconds" in x]
    overhead = None
    if cfg["strategy"]["name"] == "mergenet" and trains:
        overhead = sum(x.get("mergenet_seconds", 0.0) for x in trains) / max(
            sum(x["train_seconds"] for x in trains), 1e-9
        )
    return Run(
        federation=federation,
        method=method_label(cfg),
        seed=cfg["seed"],
        final={g: list(c.values())[-1] for g, c in curves.items()},
        curves=curves,
        score_key=score_key,
        bytes_per_round=sum(d + u for d, u in traffic.values()) / max(len(traffic), 1),
        fedavg_bytes_per_round=fedavg_cache[federation],
        seconds=json.loads((path / "run.json").read_text())["seconds"],
        overhead=overhead,
        path=path,
    )


def collect(study_dir: Path) -> list[Run]:
    cache: dict[str, float] = {}
    runs = [load_run(p.parent, cache) for p in sorted(study_dir.rglob("config.yaml"))]
    return [r for r in runs if r is not None]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _order(method: str) -> tuple[int, str]:
    return ({LOCAL: 0, GROUP_FEDAVG: 1}.get(method, 2), method)


def federation_section(federation: str, runs: list[Run], figure: Path) -> list[str]:
    by_method: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_method[run.method].append(run)
    methods = sorted(by_method, key=_order)
    groups = sorted({g for r in runs for g in r.final})
    keys = {g: next(r.score_key[g] for r in runs if g in r.score_key) for g in groups}
    means = {
        (m, g): _mean_std([r.final[g] for r in by_method[m] if g in r.final])
        for m in methods
        for g in groups
    }
    out = [f"### {federation}", ""]
    header = "| method | seeds | " + " | ".join(f"{g} ({keys[g]})" for g in groups)
    out += [header + " | mean | bytes/round | vs FedAvg full | wall s | client overhead |"]
    out += ["|---|---:|" + "---:|" * (len(groups) + 5)]
    for m in methods:
        rs = by_method[m]
        cells = [f"{100 * means[m, g][0]:.1f} ± {100 * means[m, g][1]:.1f}" for g in groups]
        avg = statistics.mean(means[m, g][0] for g in groups)
        b = statistics.mean(r.bytes_per_round for r in rs)
        full = rs[0].fedavg_bytes_per_round
        overheads = [r.overhead for r in rs if r.overhead is not None]
        oh = f"{100 * statistics.mean(overheads):.1f} %" if overheads else "–"
        ratio = f"1/{full / b:,.0f}" if b > 0 else "–"
        wall = statistics.mean(r.seconds for r in rs)
        out.append(
            f"| {m} | {len(rs)} | {' | '.join(cells)} | {100 * avg:.1f} | {b / 1e3:,.0f} kB | "
            f"{ratio} | {wall:.0f} | {oh} |"
        )
    out.append("")
    for base in (LOCAL, GROUP_FEDAVG):
        if base not in by_method:
            continue
        out.append(
            f"Gain over {base}, points (mean over seeds; ± is the std of the method's runs):"
        )
        out.append("")
        for m in methods:
            if m in (LOCAL, GROUP_FEDAVG):
                continue
            gains = ", ".join(
                f"{g} {100 * (means[m, g][0] - means[base, g][0]):+.1f}"
                f" ± {100 * means[m, g][1]:.1f}"
                for g in groups
            )
            out.append(f"- {m}: {gains}")
        out.append("")
    _plot(federation, methods, groups, means, by_method, figure)
    out += [f"![{federation}]({figure.parent.name}/{figure.name})", ""]
    return out


def _plot(federation, methods, groups, means, by_method, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [j + i * width for j in range(len(groups))]
        axes[0].bar(
            xs,
            [means[m, g][0] for g in groups],
            width,
            yerr=[means[m, g][1] for g in groups],
            label=m,
        )
        rounds: dict[int, list[float]] = defaultdict(list)
        for run in by_method[m]:
            for r in sorted({r for c in run.curves.values() for r in c}):
                vals = [c[r] for c in run.curves.values() if r in c]
                rounds[r].append(statistics.mean(vals))
        axes[1].plot(
            list(rounds), [statistics.mean(v) for v in rounds.values()], marker="o", label=m
        )
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, fontsize=8)
    axes[0].set(ylabel="final score", title="final score per group (mean ± std over seeds)")
    axes[1].set(xlabel="round", ylabel="mean score over groups", title="score per round")
    axes[1].xaxis.get_major_locator().set_params(integer=True)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(federation, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(study_dir: Path, dest: Path, *, title: str, command: str) -> Path:
    """Write the report for the runs under ``study_dir`` to ``dest`` (figures beside it)."""
    runs = collect(study_dir)
    if not runs:
        raise FileNotFoundError(f"no finished runs under {study_dir}")
    figures = dest.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    by_fed: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_fed[run.federation].append(run)
    lines = [
        f"# {title}",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')} from {len(runs)} runs in "
        f"`{study_dir.name}/`. Scores are the final round's evaluation on each client's test "
        "examples (accuracy; F1 for QA), weighted by examples within a group; ± is the standard "
        "deviation over seeds. Nothing was tuned on the test split: every setting is the "
        "config's default. Bytes per round are all clients' messages, down and up, averaged "
        "over rounds; 'vs FedAvg full' compares with FedAvg sending every client's whole model "
        "both ways. Client overhead is MergeNet's client-side time (install, packet, gradient "
        "pieces) over local training time.",
        "",
    ]
    for i, (federation, fed_runs) in enumerate(sorted(by_fed.items())):
        lines += federation_section(federation, fed_runs, figures / f"{dest.stem}-{i}.png")
    dest.write_text("\n".join(lines), encoding="utf-8")
    return dest
