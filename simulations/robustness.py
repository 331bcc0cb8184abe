"""The robustness study's report (``python -m simulations.study robustness`` ->
``docs/robustness.md``): what one or two poisoning clients cost the honest ones, with and
without the defences, what the defences cost without attackers, and how much the attackers
steered the adapter.

An attacker slot is a client of a ``federation.clients`` entry with an ``attack`` key (ids
``client-<partition>``, as the simulation names them), armed when the attack is not null. A
run's score is accuracy pooled over the own test rows of the clients of no slot at the final
round, so that runs with none, one or two armed slots score the same clients. Each attacked
run is paired (same seed) with the same method's run without attackers and without defences.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mergenet_fl.flower.runlog import pooled_curve, read_lines
from simulations.attacks import Attack
from simulations.report import conf_defaults, interval_text, method_label, paired_by

NONE = "none"
DEFENCES = ("screen", "combine", "average")  # the strategy settings that defend
UNDEFENDED = {"screen": None, "combine": "sum", "average": "mean"}


@dataclass(frozen=True)
class AttackRun:
    """The numbers of one run of the robustness study."""

    method: str  # the method's label (simulations.report.method_label)
    defence: str  # its defence settings ("none": all off)
    attack: str  # "none", or the attack's kind and factor
    attackers: tuple[str, ...]  # the attacking clients' ids
    seed: int
    honest: float  # pooled accuracy of the honest clients at the final round
    chance: float  # the same of always predicting each client's most frequent label
    server_seconds: float  # the server's time over the run (configure and aggregate)
    seconds: float  # the run's wall time
    piece_share: float | None  # the attackers' share of the adapter's gradient pieces' norm
    screened: float | None  # share of the attackers' (round, reply) pairs screened out


def attackers(federation: dict[str, Any]) -> tuple[set[str], tuple[str, ...], str]:
    """A federation's attacker slots (client ids), the armed ones, and their attack's label."""
    slots, armed, kinds, start = set(), [], set(), 0
    for entry in federation["clients"]:
        count = int(entry.get("count", 1))
        ids = [f"client-{start + i}" for i in range(count)]
        if "attack" in entry:
            slots.update(ids)
        if entry.get("attack"):
            armed += ids
            kinds.add(Attack(**entry["attack"]).label)
        start += count
    return slots, tuple(armed), " + ".join(sorted(kinds)) or NONE


def defence_label(strategy: dict[str, Any]) -> str:
    """The defences a run's strategy turned on, e.g. ``screen 3, combine median`` (a group
    average does not apply to MergeNet's transfer only, ``share=none``)."""
    keys = [k for k in DEFENCES if not (k == "average" and strategy.get("share") == "none")]
    on = [
        f"{key} {strategy[key]:g}" if isinstance(strategy[key], float) else f"{key} {strategy[key]}"
        for key in keys
        if key in strategy and strategy[key] != UNDEFENDED[key]
    ]
    return ", ".join(on) or NONE


def load(path: Path, defaults: dict[str, Any]) -> AttackRun | None:
    """One finished run's numbers (None: unfinished)."""
    if not (path / "run.json").exists():
        return None
    seconds = json.loads((path / "run.json").read_text())["seconds"]
    cfg = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
    slots, bad, attack = attackers(cfg["federation"])
    lines = read_lines(path)
    honest = [x for x in lines if x.get("client") not in slots]
    accuracy, chance = pooled_curve(honest), pooled_curve(honest, "chance")
    if not accuracy:
        return None
    servers = [x["server"] for x in lines if x.get("stage") == "train" and "server" in x]
    shares = [
        sum(s["piece_shares"].get(c, 0.0) for c in bad) for s in servers if "piece_shares" in s
    ]
    screens = [
        len(set(bad) & set(s.get("screened_packets", []) + s.get("screened_pieces", [])))
        for s in servers
    ]
    screening = cfg["strategy"].get("screen") is not None
    return AttackRun(
        method=method_label(cfg, defaults),
        defence=defence_label(cfg["strategy"]),
        attack=attack,
        attackers=bad,
        seed=int(cfg["seed"]),
        honest=list(accuracy.values())[-1],
        chance=list(chance.values())[-1],
        server_seconds=sum(
            s.get("configure_seconds", 0.0) + s.get("aggregate_seconds", 0.0) for s in servers
        ),
        seconds=seconds,
        piece_share=statistics.mean(shares) if bad and shares else None,
        screened=(
            sum(screens) / (len(bad) * len(servers)) if bad and screening and servers else None
        ),
    )


def collect(study_dir: Path) -> list[AttackRun]:
    defaults = conf_defaults()
    runs = [load(p.parent, defaults) for p in sorted(study_dir.rglob("run.json"))]
    return [r for r in runs if r is not None]


Key = tuple[str, str, str, int]  # method, defence, attack, number of attackers


def by_setting(runs: list[AttackRun]) -> dict[Key, list[AttackRun]]:
    out: dict[Key, list[AttackRun]] = defaultdict(list)
    for r in runs:
        out[(r.method, r.defence, r.attack, len(r.attackers))].append(r)
    return out


def _score(runs: list[AttackRun]) -> str:
    """The honest clients' accuracy over seeds, mean ± std, with its chance level."""
    values = [r.honest for r in runs]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    chance = statistics.mean(r.chance for r in runs)
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f} % ({100 * chance:.1f} %)"


def _mean(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{100 * statistics.mean(known):.0f} %" if known else "–"


def attack_rows(settings: dict[Key, list[AttackRun]]) -> tuple[list[str], dict[Key, tuple]]:
    """The table of every attacked setting against its method's clean, undefended runs, and
    each setting's paired cost (clean − attacked: positive is accuracy lost)."""
    out = [
        "| method | defences | attack | attackers | honest clients' accuracy (chance) | "
        "cost vs no attack, no defence | attackers' share of the adapter's step | screened |",
        "|---|---|---|---|---|---|---|---|",
    ]
    costs = {}
    for key in sorted(settings):
        method, defence, attack, count = key
        clean = settings.get((method, NONE, NONE, 0))
        if attack == NONE or clean is None:
            continue
        runs = settings[key]
        cost = paired_by(clean, runs, lambda r: r.honest)
        costs[key] = cost
        out.append(
            f"| {method} | {defence} | {attack} | {count} | {_score(runs)} | "
            f"{interval_text(cost)} | "
            f"{_mean([r.piece_share for r in runs])} | {_mean([r.screened for r in runs])} |"
        )
    return out, costs


def defence_rows(
    settings: dict[Key, list[AttackRun]],
) -> tuple[list[str], list[tuple[float, str]]]:
    """What each defence costs without attackers: accuracy (paired) and server time."""
    out = [
        "| method | defences | honest clients' accuracy (chance) | "
        "change vs no defence (negative: lost) | server seconds per run | "
        "server time vs no defence |",
        "|---|---|---|---|---|---|",
    ]
    ratios = []
    for (method, defence, attack, _), runs in sorted(settings.items()):
        if attack != NONE:
            continue
        base = settings.get((method, NONE, NONE, 0), [])
        by_seed = {r.seed: r.server_seconds for r in base}
        ratio = [r.server_seconds / by_seed[r.seed] for r in runs if by_seed.get(r.seed)]
        text = "–"
        if defence != NONE and ratio:
            ratios.append((statistics.mean(ratio), f"{method}, {defence}"))
            text = f"x{statistics.mean(ratio):.2f}"
        diff = paired_by(runs, base, lambda r: r.honest) if defence != NONE else None
        out.append(
            f"| {method} | {defence} | {_score(runs)} "
            f"| {interval_text(diff) if defence != NONE else '–'} | "
            f"{statistics.mean(r.server_seconds for r in runs):.2f} | {text} |"
        )
    return out, ratios


def targets(costs: dict[Key, tuple], ratios: list[tuple[float, str]]) -> list[str]:
    """The issue's targets, on the defended settings' worst case."""

    def worst(count: int) -> tuple[str, bool]:
        mine = {k: c for k, c in costs.items() if k[1] != NONE and k[3] == count and c}
        if not mine:
            return "n/a", False
        key = max(mine, key=lambda k: mine[k][0])
        return f"{interval_text(mine[key])}: {key[0]}, {key[2]}", mine[key][0] <= 0.01 * count

    one, two = worst(1), worst(2)
    slowest, which = max(ratios, default=(float("nan"), "n/a"))
    rows = [
        ("one attacker among 10, defences on: cost ≤ 1 point (worst setting)", *one),
        ("two attackers, defences on: cost ≤ 2 points (worst setting)", *two),
        (
            "defences cost ≤ 10 % more server time (largest ratio)",
            f"x{slowest:.2f}: {which}",
            slowest <= 1.1,
        ),
    ]
    out = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    return out + [f"| {a} | {b} | {'yes' if ok else '**no**'} |" for a, b, ok in rows] + [""]


def write_report(study_dir: Path, dest: Path, *, title: str, command: str) -> Path:
    runs = collect(study_dir)
    if not runs:
        raise FileNotFoundError(f"no finished runs under {study_dir}")
    settings = by_setting(runs)
    attacked, costs = attack_rows(settings)
    defended, ratios = defence_rows(settings)
    seconds = sum(r.seconds for r in runs)
    lines = [
        f"# {title}",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')} from {len(runs)} runs in "
        f"`{study_dir.name}/` ({seconds / 60:.0f} min of runs on 2 cores). The score is accuracy "
        "pooled over the own test rows of the honest clients (those of no attacker slot, "
        "armed or not, so every run scores the same clients) at the final round (chance: always "
        "predicting each client's most frequent label); ± is the standard deviation over "
        "seeds. A cost is the paired difference (same seed) from the same method's run without "
        "attackers and without defences, with its 95 % interval: positive is accuracy lost. "
        "The attackers' share of the adapter's step is their part of the norm of the gradient "
        "pieces that entered it, per transfer round (honest: 1 in 10 each); screened is the "
        "share of their replies the screening kept out or scaled down. An attacker that "
        "claims another client's identity is not a run here: the strategy refuses it before "
        "anything it sent is used (`tests/test_hostile.py`).",
        "",
        *targets(costs, ratios),
        "## Attacks",
        "",
        *attacked,
        "",
        "## What the defences cost without attackers",
        "",
        *defended,
        "",
    ]
    dest.write_text("\n".join(lines), encoding="utf-8")
    return dest
