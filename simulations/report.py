"""Turn a study's runs into a report: mean ± std per group and method, gains, bytes, time.

Each run folder holds ``config.yaml``, ``metrics.jsonl`` and ``run.json`` (see
:mod:`simulations.results`). Runs are grouped by federation (its set of client groups) and by
method (strategy, adapter variant, transfer cycle); seeds are the repetitions.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from mergenet_fl.flower.runlog import (
    SCORE_KEYS,
    bytes_per_round,
    chance_levels,
    group_curves,
    plain_ticks,
    pooled_curve,
    read_lines,
    round_axis,
    save_figure,
)
from simulations.config import CONF_DIR, client_group
from simulations.models import build_model
from simulations.preflight import num_classes

matplotlib.use("Agg")  # files only, no display

LOCAL, GROUP_FEDAVG, LPKA = "LocalOnly", "GroupFedAvg", "MergeNet (lpka)"
# the field's baselines by strategy name, and HtFLlib's published order on CIFAR-10 with
# Dirichlet 0.1 (HtFE8, 20 clients; ../shared/docs/htfl.md), best first
FIELD = {
    "lgfedavg": "LG-FedAvg",
    "fedproto": "FedProto",
    "fd": "FD",
    "fml": "FML",
    "fedkd": "FedKD",
    "fedtgp": "FedTGP",
    "fedgh": "FedGH",
}
# HtFLlib's fewest local steps per client: ≥ 101 rounds of ≈ 225 (../shared/docs/htfl.md)
HTFL_MIN_STEPS = 22_700
RESOLUTION_TARGET = 1.5  # points: what the benchmark is sized for (issue 24)
HTFL_C10_DIR01 = {
    "FedTGP": 88.15,
    "FedKD": 86.45,
    "FD": 86.01,
    "FML": 85.88,
    "LG-FedAvg": 84.55,
    "FedGH": 84.43,
    "FedProto": 82.07,
}
GLOBAL_KEYS = tuple(f"global_{k}" for k in SCORE_KEYS)  # eval_split=local: the global test too
TRANSFER_ONLY = "MergeNet (lpka, transfer only)"
BF16 = ", bf16"  # the label's suffix for runs whose clients computed in bf16
ABLATION_ORDER = ("lpka", "avg", "rows", "mlp")  # the paper's order, best first


@dataclass
class Run:
    """The numbers of one run."""

    federation: str
    method: str
    seed: int
    eval_split: str  # "test" or "validation"
    split: str  # how the dataset's rows became the clients': "standard" or "pooled"
    final: dict[str, dict[str, float]]  # group -> metric -> final evaluation value
    curves: dict[str, dict[int, float]]  # group -> round -> main score
    tasks: dict[str, str]  # group -> task
    bytes_per_round: float
    fedavg_bytes_per_round: float
    seconds: float
    overhead: float | None  # MergeNet's client-side time / local training time
    chance: dict[str, float] = field(default_factory=dict)  # group -> final chance level
    global_chance: dict[str, float] = field(default_factory=dict)  # on the global test
    transfer_effect: dict[str, float] = field(default_factory=dict)  # group -> last round's
    pooled: dict[int, float] = field(default_factory=dict)  # round -> pooled accuracy
    pooled_validation: dict[int, float] = field(default_factory=dict)  # on validation rows
    steps_per_client: float = 0.0  # local SGD steps of a client over the run, mean
    hubs: tuple[str, ...] = ()  # groups with more data than the others, or send-only
    # probe_install: group -> mean change of the score from installing what the server sent
    # (rounds >= 2), on the clients' test rows ("") and on the global test ("_global")
    install_gain: dict[str, dict[str, float]] = field(default_factory=dict)
    adapter: dict[str, float] = field(default_factory=dict)  # adapter_trace
    setting: str = ""  # hub_setting: how a hub federation's rows were dealt
    bf16: bool = False  # the clients computed in bf16 (autocast)
    path: Path = field(repr=False, default=Path())

    def pooled_at(self, choice: str) -> float:
        """Pooled accuracy at the ``final`` round, the ``best`` (chosen on test: biased
        upwards), or the round ``validation`` chose."""
        if choice == "final":
            return list(self.pooled.values())[-1]
        if choice == "best":
            return max(self.pooled.values())
        chosen = max(self.pooled_validation, key=self.pooled_validation.get)
        return self.pooled[chosen]


LABELLED = ("optimizer", "lr", "schedule", "warmup_steps", "weight_decay", "delta_steps", "source")


def conf_defaults() -> dict[str, Any]:
    """``conf/``'s defaults of the MergeNet settings a method label names when they differ."""
    strategy = OmegaConf.load(CONF_DIR / "strategy" / "mergenet.yaml")
    adapter = OmegaConf.load(CONF_DIR / "adapter" / "lpka.yaml")
    return {
        "rank": OmegaConf.load(CONF_DIR / "config.yaml").rank,
        **{key: strategy[key] for key in LABELLED},
        "source_norm": adapter.source_norm,
    }


def method_label(cfg: dict, defaults: dict[str, Any]) -> str:
    """The method of a run: strategy, adapter variant, and the settings that differ from
    ``defaults`` (:func:`conf_defaults`)."""
    strategy = cfg["strategy"]["name"]
    if strategy == "local":
        return LOCAL
    if strategy == "groupfedavg":
        return GROUP_FEDAVG
    if strategy in FIELD:
        return FIELD[strategy]
    label = f"MergeNet ({cfg['adapter']['variant']}"
    if cfg["transfer_every"] != 1:
        label += f", every {cfg['transfer_every']} rounds"
    if cfg["strategy"].get("share", "none") == "none":
        label += ", transfer only"
    s, a = cfg["strategy"], cfg["adapter"]
    settings = {"rank": cfg["rank"], **{k: s.get(k, defaults[k]) for k in LABELLED}}
    settings["source_norm"] = a.get("source_norm", defaults["source_norm"])
    for key, value in settings.items():
        if value != defaults[key]:
            label += f", {key} {value:g}" if isinstance(value, float) else f", {key} {value}"
    return label + ")"


def fedavg_bytes(cfg: dict) -> float:
    """Bytes one round of FedAvg on the full models would move (down and up, every client)."""
    total = 0
    for client in cfg["federation"]["clients"]:
        group = client_group(client, "client", [])  # checked when the run started
        model = build_model(group.arch_spec, num_classes(group))
        params = sum(p.numel() for p in model.parameters())
        total += 2 * 4 * params * group.count
    return float(total)


def load_run(path: Path, fedavg_cache: dict[str, float], defaults: dict[str, Any]) -> Run | None:
    if not (path / "run.json").exists():
        return None  # unfinished
    cfg = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
    lines = read_lines(path)
    curves = group_curves(lines)
    if not curves:
        return None
    final: dict[str, dict[str, float]] = defaultdict(dict)
    for metric in SCORE_KEYS + GLOBAL_KEYS:
        for group, curve in group_curves(lines, metric).items():
            final[group][metric] = list(curve.values())[-1]
    traffic = bytes_per_round(lines)
    federation = " + ".join(sorted(curves))
    if federation not in fedavg_cache:
        fedavg_cache[federation] = fedavg_bytes(cfg)
    trains = [x for x in lines if x.get("stage") == "train" and "train_seconds" in x]
    # the clients' precision as they resolved it (runs from before replies said: as asked)
    bf16 = cfg.get("precision") == "bf16" or any(x.get("bf16") for x in trains)
    hubs = hub_groups(cfg["federation"])
    steps: dict[str, float] = defaultdict(float)
    for x in trains:
        steps[x["client"]] += x.get("train_steps", 0.0)
    overhead = None
    if cfg["strategy"]["name"] == "mergenet" and trains:
        overhead = sum(x.get("mergenet_seconds", 0.0) for x in trains) / max(
            sum(x["train_seconds"] for x in trains), 1e-9
        )
    return Run(
        federation=federation,
        method=method_label(cfg, defaults),
        seed=cfg["seed"],
        eval_split=cfg.get("eval_split", "test"),
        split=cfg["federation"].get("split", "standard"),
        final=dict(final),
        curves=curves,
        tasks={c["group"]: c["task"] for c in cfg["federation"]["clients"]},
        bytes_per_round=sum(d + u for d, u in traffic.values()) / max(len(traffic), 1),
        fedavg_bytes_per_round=fedavg_cache[federation],
        seconds=json.loads((path / "run.json").read_text())["seconds"],
        overhead=overhead,
        chance=chance_levels(lines),
        global_chance={
            g: list(c.values())[-1] for g, c in group_curves(lines, "global_chance").items() if c
        },
        transfer_effect=last_transfer_effect(lines),
        pooled=pooled_curve(lines),
        pooled_validation=pooled_curve(lines, "val_accuracy", "val_num_examples"),
        steps_per_client=statistics.mean(steps.values()) if steps else 0.0,
        hubs=hubs,
        install_gain=install_gains(trains),
        adapter=adapter_trace(lines, hubs),
        setting=hub_setting(cfg["federation"], hubs),
        bf16=bf16,
        path=path,
    )


def hub_groups(federation: dict) -> tuple[str, ...]:
    """The groups that are a hub: send-only, or with more training examples per client than
    the federation's ``examples_per_client`` (``federation=hub``, ``hub_frozen``)."""
    default = federation.get("examples_per_client")
    return tuple(
        c["group"]
        for c in federation["clients"]
        if c.get("send_only") or (default and c.get("examples", default) > default)
    )


def partition_words(federation: dict) -> str:
    """How a federation splits its rows among clients, in words: ``Dirichlet 0.1``, ``IID``."""
    scheme = federation["partition"]
    return f"Dirichlet {federation['alpha']}" if scheme == "dirichlet" else scheme.upper()


def hub_setting(federation: dict, hubs: Sequence[str]) -> str:
    """How a federation with ``hubs`` dealt its rows, in words: the other clients' rows each
    and their partition, each hub's rows, and whether it is frozen (then how many batches a
    round a method's own model on it, FML's or FedKD's, trains). Empty without hubs."""
    if not hubs:
        return ""
    default = federation.get("examples_per_client")
    words = [f"the data-poor clients: {default} rows each, {partition_words(federation)}"]
    for c in federation["clients"]:
        if c["group"] in hubs:
            frozen = c.get("frozen")
            words.append(
                f"{c['group']}: {c.get('examples') or default} rows"
                + (", frozen" if frozen else "")
                + (", send-only" if c.get("send_only") else "")
                + (
                    f" (a method's own model on it trains {c['local_steps']} batches a round)"
                    if frozen and c.get("local_steps")
                    else ""
                )
            )
    return "; ".join(words)


def install_gains(trains: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Suffix (``""``: own test rows, ``"_global"``) -> group -> mean ``install_gain`` of its
    clients' train replies from round 2 on (round 1 installs what every client starts from)."""
    gains: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for x in trains:
        for suffix in ("", "_global"):
            if x["round"] >= 2 and f"install_gain{suffix}" in x:
                gains[suffix][x["group"]].append(x[f"install_gain{suffix}"])
    return {s: {g: statistics.mean(v) for g, v in by.items()} for s, by in gains.items()}


def adapter_trace(lines: list[dict[str, Any]], hubs: Sequence[str]) -> dict[str, float]:
    """What MergeNet's adapter attended to: over the targets outside ``hubs`` in the last
    transfer round, the mean share of attention to the hub groups (``hub_attention``;
    ``uniform``: what an even spread over the source groups gives), and the adapter's mean
    ``step_norm`` over its steps. Empty without hubs or attention (the transfer effect is
    :func:`last_transfer_effect`'s)."""
    rounds = [
        x["server"] for x in lines if x.get("stage") == "train" and "targets" in x.get("server", {})
    ]
    groups = {x["client"]: x["group"] for x in lines if "group" in x and "client" in x}
    stats = [
        layer
        for client, layers in (rounds[-1]["targets"].items() if rounds else ())
        if groups.get(client) not in hubs
        for layer in layers.values()
    ]
    if not hubs or not stats or not all(x.get("attention") for x in stats):
        return {}
    steps = [r["step_norm"] for r in rounds if "step_norm" in r]
    return {
        "hub_attention": statistics.mean(
            sum(share for g, share in x["attention"].items() if g in hubs) for x in stats
        ),
        "uniform": statistics.mean(
            sum(g in hubs for g in x["attention"]) / len(x["attention"]) for x in stats
        ),
        "step_norm": statistics.mean(steps) if steps else math.nan,
    }


def last_transfer_effect(lines: list[dict[str, Any]]) -> dict[str, float]:
    """Group -> mean ``transfer_effect`` of its target layers in the last transfer round."""
    groups = {x["client"]: x["group"] for x in lines if "group" in x and "client" in x}
    rounds = [x for x in lines if x.get("stage") == "train" and "targets" in x.get("server", {})]
    if not rounds:
        return {}
    effects: dict[str, list[float]] = defaultdict(list)
    for client, layers in rounds[-1]["server"]["targets"].items():
        for stats in layers.values():
            effects[groups.get(client, client)].append(stats["transfer_effect"])
    return {g: statistics.mean(v) for g, v in effects.items()}


T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired(method: list[Run], base: list[Run], group: str) -> tuple[float, float, int] | None:
    """Mean paired difference (same seed) of the group's main score, its 95 % t-interval
    half-width, and the number of pairs; None without two pairs."""
    return paired_by(
        [r for r in method if group in r.final],
        [r for r in base if group in r.final],
        lambda r: r.final[group][_main_metric(r, group)],
    )


def paired_by(
    method: list[Run], base: list[Run], value: Callable[[Run], float]
) -> tuple[float, float, int] | None:
    """Mean paired difference (same seed) of ``value``, its 95 % t-interval half-width, and
    the number of pairs; None without two pairs."""
    by_seed = {r.seed: r for r in base}
    diffs = [value(r) - value(by_seed[r.seed]) for r in method if r.seed in by_seed]
    interval = t_interval(diffs)
    return None if interval is None else (*interval, len(diffs))


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """The mean of ``values`` and its 95 % t-interval half-width; None with fewer than two."""
    if len(values) < 2:
        return None
    half = T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5
    return statistics.mean(values), half


def by_federation(runs: list[Run]) -> dict[str, list[Run]]:
    """Federation -> its runs."""
    out: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        out[run.federation].append(run)
    return out


def collect(study_dir: Path) -> list[Run]:
    cache: dict[str, float] = {}
    defaults = conf_defaults()
    loaded = [load_run(p.parent, cache, defaults) for p in sorted(study_dir.rglob("config.yaml"))]
    runs = [r for r in loaded if r is not None]
    for fed_runs in by_federation(runs).values():
        if len({r.bf16 for r in fed_runs}) > 1:  # bf16 against fp32: methods of their own
            for run in fed_runs:
                run.method += BF16 if run.bf16 else ""
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _order(method: str) -> tuple[int, str]:
    return ({LOCAL: 0, GROUP_FEDAVG: 1}.get(method, 2), method)


def _main_metric(run: Run, group: str) -> str:
    return next(k for k in SCORE_KEYS if k in run.final[group])


@dataclass
class Table:
    """One federation's runs by method, with mean ± std over seeds per group and metric."""

    by_method: dict[str, list[Run]]
    groups: list[str]
    metrics: dict[str, list[str]]  # group -> its metrics, main score first
    stats: dict[tuple[str, str, str], tuple[float, float]]  # (method, group, metric)

    @classmethod
    def of(cls, runs: list[Run]) -> Table:
        by_method: dict[str, list[Run]] = defaultdict(list)
        for run in runs:
            by_method[run.method].append(run)
        groups = sorted({g for r in runs for g in r.final})
        metrics = {
            g: [k for k in SCORE_KEYS + GLOBAL_KEYS if any(k in r.final.get(g, {}) for r in runs)]
            for g in groups
        }
        stats = {
            (m, g, k): _mean_std([r.final[g][k] for r in rs if k in r.final.get(g, {})])
            for m, rs in by_method.items()
            for g in groups
            for k in metrics[g]
        }
        return cls(
            dict(sorted(by_method.items(), key=lambda i: _order(i[0]))), groups, metrics, stats
        )

    def score(self, method: str, group: str) -> tuple[float, float]:
        """Mean ± std of the group's main score (accuracy; F1 for QA)."""
        return self.stats[method, group, self.metrics[group][0]]

    def overall(self, method: str) -> float:
        return statistics.mean(self.score(method, g)[0] for g in self.groups)

    def chance(self, group: str, split: str = "chance") -> float | None:
        """The group's final chance level, mean over all runs; None where no run reports it
        (``split="global_chance"``: on the global test)."""
        levels = [
            getattr(r, split)[group]
            for rs in self.by_method.values()
            for r in rs
            if group in getattr(r, split)
        ]
        return statistics.mean(levels) if levels else None


def federation_section(federation: str, runs: list[Run], figure: Path) -> list[str]:
    """The federation's table, paired differences, transfer effect and gains, and one figure
    per group, written to ``<figure>-<group>.png``."""
    table = Table.of(runs)
    groups = table.groups
    out = [f"### {federation}", ""]
    header = "| method | seeds | " + " | ".join(
        f"{g} ({' / '.join(table.metrics[g])})" for g in groups
    )
    out += [header + " | mean | bytes/round | vs FedAvg full | wall s | client overhead |"]
    out += ["|---|---:|" + "---:|" * (len(groups) + 5)]
    for m, rs in table.by_method.items():
        cells = [
            " / ".join(
                "{:.1f} ± {:.1f}".format(*(100 * v for v in table.stats[m, g, k]))
                for k in table.metrics[g]
            )
            for g in groups
        ]
        b = statistics.mean(r.bytes_per_round for r in rs)
        full = rs[0].fedavg_bytes_per_round
        overheads = [r.overhead for r in rs if r.overhead is not None]
        oh = f"{100 * statistics.mean(overheads):.1f} %" if overheads else "–"
        ratio = f"1/{full / b:,.0f}" if b > 0 else "–"
        wall = statistics.mean(r.seconds for r in rs)
        out.append(
            f"| {m} | {len(rs)} | {' | '.join(cells)} | {100 * table.overall(m):.1f} | "
            f"{b / 1e3:,.0f} kB | {ratio} | {wall:.0f} | {oh} |"
        )

    def levels(g: str) -> str:
        both = [table.chance(g), table.chance(g, "global_chance")]
        return " / ".join(f"{100 * c:.1f}" for c in both if c is not None) or "–"

    out.append(
        "| chance (always the most frequent label; QA: always 'no answer') | | "
        + " | ".join(levels(g) for g in groups)
        + " | | | | | |"
    )
    out.append("")
    if LOCAL in table.by_method:
        out += [
            "Paired differences against LocalOnly (same seed, same data, same sampled clients), "
            "points of the main score, mean and 95 % t-interval over seeds:",
            "",
        ]
        for m, rs in table.by_method.items():
            if m == LOCAL:
                continue
            cells = []
            for g in groups:
                diff = paired(rs, table.by_method[LOCAL], g)
                cells.append(
                    f"{g} n/a"
                    if diff is None
                    else f"{g} {100 * diff[0]:+.1f} [{100 * (diff[0] - diff[1]):+.1f}, "
                    f"{100 * (diff[0] + diff[1]):+.1f}]"
                )
            out.append(f"- {m}: {', '.join(cells)}")
        out.append("")
    effects = {
        m: {
            g: statistics.mean(r.transfer_effect[g] for r in rs if g in r.transfer_effect)
            for g in groups
            if any(g in r.transfer_effect for r in rs)
        }
        for m, rs in table.by_method.items()
    }
    if any(effects.values()):
        out += [
            "Transfer effect in the last transfer round (‖merged − merged from the target's "
            "own group alone‖ / ‖its own low-rank part‖; 0: the other groups change nothing):",
            "",
        ]
        for m, by_group in effects.items():
            if by_group:
                cells = ", ".join(f"{g} {v:.3g}" for g, v in by_group.items())
                out.append(f"- {m}: {cells}")
        out.append("")
    for base in (LOCAL, GROUP_FEDAVG):
        if base not in table.by_method:
            continue
        out.append(
            f"Gain over {base}, points of the main score (mean over seeds; ± is the std of "
            "the method's runs):"
        )
        out.append("")
        for m in table.by_method:
            if m in (LOCAL, GROUP_FEDAVG):
                continue
            gains = ", ".join(
                f"{g} {100 * (table.score(m, g)[0] - table.score(base, g)[0]):+.1f}"
                f" ± {100 * table.score(m, g)[1]:.1f}"
                for g in groups
            )
            out.append(f"- {m}: {gains}")
        out.append("")
    for group in groups:
        path = group_figure(figure, group)
        save_figure(_plot(federation, table, group), path)
        out += [figure_link(f"{federation}: {group}", path), ""]
    return out


def study_seconds(runs: list[Run]) -> float:
    """Wall time of the sweeps (a sweep is one folder of runs): first start to last end, summed.

    Sweeps run again later count once, without the time between them.
    """
    spans: dict[Path, list[float]] = defaultdict(list)
    for run in runs:
        end = (run.path / "run.json").stat().st_mtime
        spans[run.path.parent] += [end - run.seconds, end]
    return sum(max(t) - min(t) for t in spans.values())


def targets_section(runs: list[Run]) -> list[str]:
    """The issue's targets against what the runs measured (the federation that has both
    baselines and MergeNet (lpka))."""
    if any(r.method.endswith(BF16) for r in runs):  # a federation mixes precisions
        return precision_targets(runs)
    tables = [Table.of(rs) for rs in by_federation(runs).values()]
    with_reference = [t for t in tables if LOCAL in t.by_method and reference_methods(t)[0]]
    if with_reference:
        return reference_targets(with_reference[0], runs)
    with_hub = [t for t in tables if LOCAL in t.by_method and _hubs(t)]
    if with_hub:
        return hub_targets(with_hub[0], runs)
    pairs = [
        t
        for t in tables
        if GROUP_FEDAVG not in t.by_method and LOCAL in t.by_method and variant_method(t, "lpka")
    ]
    tables = [t for t in tables if {LOCAL, GROUP_FEDAVG, LPKA} <= set(t.by_method)]
    if not tables:
        return paper_targets(pairs[0], runs) if pairs else []
    t = tables[0]
    lpka_runs = t.by_method[LPKA]
    image = [g for g in t.groups if lpka_runs[0].tasks.get(g) == "image_classification"]

    def image_gain(base: str) -> float:
        return 100 * statistics.mean(t.score(LPKA, g)[0] - t.score(base, g)[0] for g in image)

    worse = [
        g
        for g in t.groups
        if t.score(LPKA, g)[0] - t.score(LOCAL, g)[0]
        < -max(t.score(LPKA, g)[1], t.score(LOCAL, g)[1])
    ]
    variants = [v for v in ABLATION_ORDER if f"MergeNet ({v})" in t.by_method]
    ablation = [t.overall(f"MergeNet ({v})") for v in variants]
    order_holds = len(variants) == len(ABLATION_ORDER) and (
        ablation[0] >= ablation[1] >= ablation[2] > ablation[3]
    )

    def ratio(method: str) -> float:
        runs = t.by_method[method]
        return statistics.mean(r.fedavg_bytes_per_round / r.bytes_per_round for r in runs)

    # MergeNet's own messages are those of "transfer only"; lpka also runs group FedAvg.
    transfer = TRANSFER_ONLY if TRANSFER_ONLY in t.by_method else LPKA
    traffic = f"{transfer}: 1/{ratio(transfer):,.0f}"
    if transfer != LPKA:
        traffic += f"; {LPKA} with group FedAvg of the other parameters: 1/{ratio(LPKA):,.0f}"
    overhead = 100 * statistics.mean(r.overhead or 0.0 for r in lpka_runs)
    minutes = study_seconds(runs) / 60

    def yes(ok: bool) -> str:
        return "yes" if ok else "**no**"

    gain_local, gain_group = image_gain(LOCAL), image_gain(GROUP_FEDAVG)
    rows = [
        (
            "MergeNet (lpka) ≥ LocalOnly + 2 points, image groups",
            f"{gain_local:+.1f} points",
            yes(gain_local >= 2),
        ),
        (
            "MergeNet (lpka) ≥ GroupFedAvg + 1 point, image groups",
            f"{gain_group:+.1f} points",
            yes(gain_group >= 1),
        ),
        (
            "no group worse than LocalOnly beyond seed noise (the larger std)",
            ", ".join(worse) if worse else "none worse",
            yes(not worse),
        ),
        (
            "ablation order lpka ≥ avg ≥ rows > mlp (mean score over groups)",
            ", ".join(f"{v} {100 * a:.1f}" for v, a in zip(variants, ablation, strict=True)),
            yes(order_holds),
        ),
        (
            "MergeNet's bytes per round ≤ 1/100 of FedAvg on the full models",
            traffic,
            yes(ratio(transfer) >= 100),
        ),
        (
            "MergeNet's client-side steps < 5 % of local training",
            f"{overhead:.1f} %",
            yes(overhead < 5),
        ),
        (
            "study wall time (per sweep, first run's start to last run's end; summed)",
            f"{minutes:.0f} min",
            "–",
        ),
    ]
    out = [
        f"## Targets ({' + '.join(t.groups)})",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return out + [""]


def pooled_section(runs: list[Run], figures: dict[str, Path]) -> list[str]:
    """HtFLlib's number, per federation whose runs all report it: accuracy pooled over every
    client's test rows (all correct / all scored) at the final round, at the best round
    (chosen on test, as HtFLlib reports: biased upwards) and at the round the validation rows
    chose; the final round's 95 % interval; the paired difference to LocalOnly with its 95 %
    interval, whose widest half-width is the instrument's resolution; the order of the field's
    methods against HtFLlib's; and the final round's :func:`pooled_figure`, written to
    ``<figures[federation]>-pooled.png``."""
    out: list[str] = []
    for federation, fed_runs in sorted(by_federation(runs).items()):
        t = Table.of(fed_runs)
        classifying = all(t.metrics[g][0] == "accuracy" for g in t.groups)
        if not classifying or not all(r.pooled for r in fed_runs):
            continue
        choices = ["final", "best"]
        if all(r.pooled_validation for r in fed_runs):
            choices.append("validation")
        names = {"final": "final", "best": "best (on test)", "validation": "chosen on validation"}
        columns = [
            *(names[c] for c in choices),
            "final, 95 % interval",
            *(f"Δ {names[c]} vs LocalOnly" for c in choices if c != "best"),
            "local steps per client",
        ]
        all_steps: list[float] = []
        out += [
            f"## Pooled accuracy, HtFLlib's number ({federation})",
            "",
            "| method | seeds | " + " | ".join(columns) + " |",
            "|---|---:|" + "---:|" * len(columns),
        ]
        finals = {m: pooled_final(rs) for m, rs in t.by_method.items()}
        halves: dict[str, float] = {}  # method -> half-width of its final Δ vs LocalOnly
        for m, rs in t.by_method.items():
            cells = [
                "{:.1f} ± {:.1f}".format(
                    *(100 * v for v in _mean_std([r.pooled_at(c) for r in rs]))
                )
                for c in choices
            ]
            mean, half = finals[m]
            cells.append(
                "–" if half is None else f"[{100 * (mean - half):.1f}, {100 * (mean + half):.1f}]"
            )
            for c in (c for c in choices if c != "best"):
                diff = (
                    None
                    if m == LOCAL
                    else paired_by(rs, t.by_method.get(LOCAL, []), lambda r, c=c: r.pooled_at(c))
                )
                if diff is None:
                    cells.append("–")
                    continue
                cells.append(f"{100 * diff[0]:+.1f} ± {100 * diff[1]:.1f} (n={diff[2]})")
                if c == "final":
                    halves[m] = 100 * diff[1]
            steps = statistics.mean(r.steps_per_client for r in rs)
            all_steps.append(steps)
            out.append(f"| {m} | {len(rs)} | {' | '.join(cells)} | {steps:,.0f} |")
        final = {m: mean for m, (mean, _) in finals.items()}
        ours = sorted((m for m in final if m in HTFL_C10_DIR01), key=final.get, reverse=True)
        theirs = [m for m in HTFL_C10_DIR01 if m in ours]
        chance = pooled_chance(t)
        figure = figures[federation].with_name(figures[federation].name + "-pooled.png")
        save_figure(pooled_figure(federation, finals, chance), figure)
        out += [
            "",
            f"Chance (most frequent label of a client's test rows, mean over groups): "
            f"{100 * chance:.1f} %."
            if chance is not None
            else "",
            resolution_line(halves),
            steps_line(statistics.mean(all_steps)),
            f"Order at the final round: {' > '.join(ours) or '–'}; HtFLlib's (CIFAR-10, Dir "
            f"0.1, ≥ {HTFL_MIN_STEPS / 1000:.1f}k local steps per client): "
            f"{' > '.join(theirs) or '–'}.",
            "Pairs the instrument separates at the final round (paired 95 % interval clear of "
            "0): " + (", ".join(separated_pairs(t.by_method, final)) or "none") + ".",
            "",
            figure_link(f"{federation}: pooled accuracy", figure),
            "",
            "Points: the mean over seeds; bars: that mean's 95 % t-interval. Overlapping bars "
            "may still be told apart by the paired intervals above, in which what the runs of "
            "one seed share cancels.",
            "",
        ]
    return out


def resolution_line(halves: dict[str, float]) -> str:
    """The instrument's resolution from each method's half-width of the paired 95 % interval
    of its final pooled accuracy against LocalOnly (``halves``, points): the median, how many
    are within :data:`RESOLUTION_TARGET`, and the widest."""
    if not halves:
        return "Resolution: unknown (fewer than two seeds)."
    widest = max(halves, key=halves.get)
    within = sum(h <= RESOLUTION_TARGET for h in halves.values())
    return (
        "Resolution (half-width of the paired 95 % interval of final pooled accuracy against "
        f"LocalOnly): median {statistics.median(halves.values()):.1f} points over "
        f"{len(halves)} methods, ≤ {RESOLUTION_TARGET} for {within} of them; widest "
        f"{halves[widest]:.1f} ({widest})."
    )


def steps_line(steps: float) -> str:
    """A client's local steps in the run against HtFLlib's fewest (empty if unknown)."""
    if steps <= 0:
        return ""
    return (
        f"Local steps per client: {steps:,.0f}, 1/{HTFL_MIN_STEPS / steps:.0f} of HtFLlib's "
        f"≥ {HTFL_MIN_STEPS:,} (≥ 101 rounds of ≈ 225 steps, CIFAR-10)."
    )


def pooled_final(runs: list[Run]) -> tuple[float, float | None]:
    """Pooled accuracy at the final round, mean over ``runs`` (seeds), and its 95 %
    t-interval half-width (None with a single seed)."""
    values = [r.pooled_at("final") for r in runs]
    return t_interval(values) or (values[0], None)


def pooled_chance(t: Table) -> float | None:
    """The chance level beside pooled accuracy: the groups' (:meth:`Table.chance`), mean over
    those that report one; None where none does."""
    levels = [c for c in map(t.chance, t.groups) if c is not None]
    return statistics.mean(levels) if levels else None


def pooled_figure(
    federation: str, finals: dict[str, tuple[float, float | None]], chance: float | None
) -> Figure:
    """Every method's pooled final-round accuracy, mean with its 95 % interval
    (:func:`pooled_final`), best at the top; LocalOnly's mean dotted, chance dashed."""
    ranked = sorted(finals, key=lambda m: finals[m][0])
    fig, ax = plt.subplots(figsize=(8, 1.8 + 0.35 * len(ranked)))
    plain_ticks(ax)
    ax.errorbar(
        [100 * finals[m][0] for m in ranked],
        range(len(ranked)),
        xerr=[100 * (finals[m][1] or 0.0) for m in ranked],  # one seed: a point
        fmt="o",
        capsize=3,
        label="mean over seeds, 95 % interval",
    )
    ax.set_yticks(range(len(ranked)), ranked)
    if LOCAL in finals:
        ax.axvline(100 * finals[LOCAL][0], color="grey", linestyle=":", label=f"{LOCAL} (mean)")
    if chance is not None:
        ax.axvline(100 * chance, color="grey", linestyle="--", label="chance")
    ax.set(xlabel="pooled accuracy at the final round (%)")
    ax.grid(alpha=0.3, axis="x")
    # above the axes: clear of every point, and the axes keep the figure's width
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1), ncols=3, frameon=False)
    fig.suptitle(federation, fontsize=9)
    return fig


def figure_link(alt: str, path: Path) -> str:
    """Markdown that shows ``path``, a figure in ``figures/`` beside the report."""
    return f"![{alt}]({path.parent.name}/{path.name})"


def separated_pairs(by_method: dict[str, list[Run]], final: dict[str, float]) -> list[str]:
    """``"A > B (+d ± h)"`` for every pair of methods whose paired difference of pooled
    final-round accuracy has a 95 % interval that excludes 0, largest difference first."""
    out = []
    ranked = sorted(final, key=final.get, reverse=True)
    for i, a in enumerate(ranked):
        for b in ranked[i + 1 :]:
            diff = paired_by(by_method[a], by_method[b], lambda r: r.pooled_at("final"))
            if diff is not None and abs(diff[0]) > diff[1]:
                out.append((diff[0], f"{a} > {b} ({100 * diff[0]:+.1f} ± {100 * diff[1]:.1f})"))
    return [text for _, text in sorted(out, reverse=True)]


def field_section(runs: list[Run]) -> list[str]:
    """Where MergeNet stands among the field's baselines, per federation that has them:
    each method's mean gain over LocalOnly (local test, mean over groups), best first, and the
    baselines' order against HtFLlib's published one."""
    out: list[str] = []
    for federation, fed_runs in sorted(by_federation(runs).items()):
        t = Table.of(fed_runs)
        field_methods = [m for m in t.by_method if m in FIELD.values()]
        if LOCAL not in t.by_method or not field_methods:
            continue
        gains = {m: 100 * (t.overall(m) - t.overall(LOCAL)) for m in t.by_method if m != LOCAL}
        ranked = sorted(gains, key=gains.get, reverse=True)
        mergenet = [m for m in ranked if m.startswith("MergeNet")]
        best = max(field_methods, key=gains.get)
        ours = [m for m in ranked if m in HTFL_C10_DIR01]
        theirs = [m for m in HTFL_C10_DIR01 if m in ours]
        out += [
            f"## Among the field's methods ({federation})",
            "",
            "Gain over LocalOnly, points of the mean score over groups, best first:",
            "",
            *(f"- {m}: {gains[m]:+.1f}" for m in ranked),
            "",
            "| target | measured | met |",
            "|---|---|---|",
        ]
        for m in mergenet:
            out.append(
                f"| {m} ≥ the best baseline ({best}) | {gains[m]:+.1f} vs {gains[best]:+.1f} "
                f"| {_yes(gains[m] >= gains[best])} |"
            )
        out += [
            f"| the baselines' order matches HtFLlib's (CIFAR-10, Dir 0.1: "
            f"{' > '.join(theirs)}) | {' > '.join(ours)} | {_yes(ours == theirs)} |",
            "",
            regime(fed_runs[0]),
            "",
        ]
    return out


def regime(run: Run) -> str:
    """How far a run's setting is from HtFLlib's (its published tables' runs)."""
    cfg = OmegaConf.to_container(OmegaConf.load(run.path / "config.yaml"))
    fed = cfg["federation"]
    clients = sum(c.get("count", 1) for c in fed["clients"])
    archs = sorted({client_group(c, "client", []).arch for c in fed["clients"]})
    steps = cfg.get("local_steps")
    per_round = f"{steps} batches of {cfg['batch_size']}" if steps else "local epochs"
    return (
        f"How far this is from HtFLlib's regime: here {clients} clients, "
        f"{fed['examples_per_client']} training examples each ({partition_words(fed)}), "
        f"{cfg['num_rounds']} rounds of {per_round}, architectures {', '.join(archs)}, "
        "2 CPU cores. HtFLlib's tables: 20 clients with all of "
        "CIFAR-10 between them (about 2,250 training images each), one epoch of batches of 10 "
        "per round, up to 2,000 rounds (the best round reported), 8 architectures up to "
        "ResNet-152, on GPUs. Its absolute numbers (80-90 % on CIFAR-10 Dir 0.1) are therefore "
        "not comparable with these; the order of the methods is what can be compared."
    )


def variant_method(t: Table, variant: str) -> str | None:
    """The one method of ``t`` that is MergeNet with adapter ``variant`` (whatever settings its
    label names), or None when there is none or several."""
    found = [m for m in t.by_method if re.match(rf"MergeNet \({variant}[,)]", m)]
    return found[0] if len(found) == 1 else None


def paper_targets(t: Table, runs: list[Run]) -> list[str]:
    """The paper's claims, in its own two-model regime, against what the runs measured."""
    methods = {v: variant_method(t, v) for v in ABLATION_ORDER}
    variants = [v for v, m in methods.items() if m is not None]
    ablation = [t.overall(methods[v]) for v in variants]
    lpka = methods["lpka"]
    order_holds = len(variants) == len(ABLATION_ORDER) and (
        ablation[0] >= ablation[1] >= ablation[2] > ablation[3]
    )
    rows = []
    for g in t.groups:
        diff = paired(t.by_method[lpka], t.by_method[LOCAL], g)
        met = diff is not None and diff[0] >= 0.01
        rows.append((f"{lpka} ≥ LocalOnly + 1 point: {g}", interval_text(diff), _yes(met)))
    rows.append(
        (
            "ablation order lpka ≥ avg ≥ rows > mlp (mean score over both models)",
            ", ".join(f"{v} {100 * a:.1f}" for v, a in zip(variants, ablation, strict=True)),
            _yes(order_holds),
        )
    )
    low = min(t.score(LOCAL, g)[0] for g in t.groups)
    rows.append(
        (
            "both models far above chance: LocalOnly ≥ 45 %",
            f"lowest {100 * low:.1f} %",
            _yes(low >= 0.45),
        )
    )
    return _targets_table(f"## Targets ({' + '.join(t.groups)})", rows, runs)


def reference_methods(t: Table) -> tuple[str | None, str | None]:
    """The MergeNet methods of ``t`` with the ``reference`` adapter: real source, random
    source (None where there is not exactly one)."""
    found = [m for m in t.by_method if re.match(r"MergeNet \(reference[,)]", m)]
    real = [m for m in found if "source random" not in m and "source none" not in m]
    random = [m for m in found if "source random" in m]
    return (real[0] if len(real) == 1 else None), (random[0] if len(random) == 1 else None)


def _difference(t: Table, method: str, base: str, group: str) -> tuple[str, bool]:
    """``method − base`` on ``group``, paired by seed, with its 95 % interval; and whether
    its mean reaches +1 point."""
    diff = paired(t.by_method[method], t.by_method[base], group)
    return interval_text(diff), diff is not None and diff[0] >= 0.01


def reference_targets(t: Table, runs: list[Run]) -> list[str]:
    """Study ``reference``'s targets: on each group that receives (all but the send-only
    source), the real source against LocalOnly and against the random source."""
    real, random = reference_methods(t)
    targets = [g for g in t.groups if g not in _hubs(t)]
    rows = []
    for g in targets:
        text, met = _difference(t, real, LOCAL, g)
        rows.append((f"real source ≥ LocalOnly + 1 point: {g}", text, _yes(met)))
        if random is not None:
            text, met = _difference(t, real, random, g)
            rows.append((f"real source ≥ random source + 1 point: {g}", text, _yes(met)))
        lpka = variant_method(t, "lpka")
        if lpka is not None:
            text, _ = _difference(t, lpka, LOCAL, g)
            rows.append((f"{lpka} − LocalOnly: {g} (for comparison)", text, "–"))
    for g in t.groups:
        chance = t.chance(g)
        mean, std = t.score(LOCAL, g)
        above = f", chance {100 * chance:.1f} %" if chance is not None else ""
        rows.append(
            (f"LocalOnly above chance: {g}", f"{100 * mean:.1f} ± {100 * std:.1f} %{above}", "–")
        )
    return _targets_table(f"## Targets ({' + '.join(t.groups)})", rows, runs)


def _hubs(t: Table) -> tuple[str, ...]:
    return next(iter(next(iter(t.by_method.values())))).hubs


def hub_targets(t: Table, runs: list[Run]) -> list[str]:
    """Study ``hub``'s targets, on the data-poor clients only (every group but the hub's):
    each score is their groups' mean (equal client counts: the pooled score), per seed."""
    poor = [g for g in t.groups if g not in _hubs(t)]

    def pooled(metric: str) -> Callable[[Run], float]:
        return lambda r: statistics.mean(r.final[g][metric] for g in poor)

    def diff(method: str, base: str) -> tuple[float, float, int] | None:
        return paired_by(t.by_method[method], t.by_method[base], pooled("accuracy"))

    def mean(method: str, metric: str = "accuracy") -> float:
        return statistics.mean(pooled(metric)(r) for r in t.by_method[method])

    real = next((m for m in t.by_method if m.startswith("MergeNet") and "source" not in m), None)
    random = next(
        (m for m in t.by_method if m.startswith("MergeNet") and "source random" in m), None
    )
    field = [m for m in t.by_method if m in FIELD.values()]
    rows = [("the federation as run", t.by_method[LOCAL][0].setting, "–")]
    moving = [m for m in field if (d := diff(m, LOCAL)) is not None and d[0] - d[1] > 0]
    rows.append(
        (
            "a field method clears LocalOnly (interval above 0): the control works",
            ", ".join(f"{m} {interval_text(diff(m, LOCAL))}" for m in moving) or "none",
            _yes(bool(moving)),
        )
    )
    if real is not None:
        d = diff(real, LOCAL)
        rows.append(
            (
                f"{real} ≥ LocalOnly + 3 points",
                interval_text(d),
                _yes(d is not None and d[0] >= 0.03),
            )
        )
        if field:
            best = max(field, key=mean)
            gap = mean(real) - mean(best)
            rows.append(
                (
                    f"{real} within 1 point of the best field method ({best}) or above",
                    f"{100 * gap:+.1f} points",
                    _yes(gap >= -0.01),
                )
            )
        if random is not None:
            d = diff(real, random)
            rows.append(
                (
                    "real source ≥ random source + 2 points",
                    interval_text(d),
                    _yes(d is not None and d[0] >= 0.02),
                )
            )
    for m in t.by_method:
        on_global = (
            f", global test {100 * mean(m, 'global_accuracy'):.1f} %"
            if all("global_accuracy" in r.final[g] for r in t.by_method[m] for g in poor)
            else ""
        )
        rows.append((f"{m}: data-poor clients", f"{100 * mean(m):.1f} %{on_global}", "–"))
        if all(r.adapter for r in t.by_method[m]):
            trace = {
                key: statistics.mean(r.adapter[key] for r in t.by_method[m])
                for key in ("hub_attention", "uniform", "step_norm")
            }
            trace["transfer_effect"] = statistics.mean(
                r.transfer_effect[g] for r in t.by_method[m] for g in poor
            )
            rows.append(
                (
                    f"{m}: the adapter (last round; steps: mean)",
                    f"transfer effect {trace['transfer_effect']:.3g}, attention to the hub "
                    f"{trace['hub_attention']:.3f} (even spread {trace['uniform']:.3f}), "
                    f"step norm {trace['step_norm']:.2g}",
                    "–",
                )
            )
        if all(r.install_gain.get("") for r in t.by_method[m]):
            gains = {
                suffix: statistics.mean(
                    statistics.mean(r.install_gain[suffix][g] for g in poor) for r in t.by_method[m]
                )
                for suffix in ("", "_global")
                if all(suffix in r.install_gain for r in t.by_method[m])
            }
            rows.append(
                (
                    f"{m}: what the server's install does, scored before training "
                    "(rounds 2 on; own test, global test)",
                    " / ".join(f"{100 * v:+.2f} points" for v in gains.values()),
                    "–",
                )
            )
    for hub in _hubs(t):
        rows.append((f"the hub ({hub}), apart", f"{100 * t.score(LOCAL, hub)[0]:.1f} %", "–"))
    chances = ", ".join(f"{g} {100 * c:.1f} %" for g in poor if (c := t.chance(g)) is not None)
    title = f"## Targets (data-poor clients: {' + '.join(poor)}; chance {chances})"
    return _targets_table(title, rows, runs)


def final_score(run: Run) -> float:
    """HtFLlib's pooled accuracy at the final round where the run reports it, else the mean
    over groups of the final main score."""
    if run.pooled:
        return run.pooled_at("final")
    return statistics.mean(run.final[g][_main_metric(run, g)] for g in run.final)


def precision_targets(runs: list[Run]) -> list[str]:
    """Study ``precision``'s targets: per federation and method, the clients in bf16 against
    the same method in fp32 at the same seeds (:func:`final_score`). ``precision=auto`` may
    become the default only if no bf16 mean falls below fp32's by more than the seed noise
    (fp32's standard deviation over seeds)."""
    rows = []
    for federation, fed_runs in sorted(by_federation(runs).items()):
        t = Table.of(fed_runs)
        chance = pooled_chance(t)
        at_chance = "" if chance is None else f", chance {100 * chance:.1f} %"
        for method in [m for m in t.by_method if f"{m}{BF16}" in t.by_method]:
            full, half = t.by_method[method], t.by_method[f"{method}{BF16}"]
            noise = _mean_std([final_score(r) for r in full])[1]
            diff = paired_by(half, full, final_score)
            speed = statistics.mean(r.seconds for r in full) / statistics.mean(
                r.seconds for r in half
            )
            scores = ", ".join(
                f"{name} {100 * statistics.mean(map(final_score, rs)):.1f} %"
                for name, rs in (("fp32", full), ("bf16", half))
            )
            rows.append(
                (
                    f"{federation}: {method}, bf16 − fp32 ≥ −seed noise ({scores}{at_chance})",
                    f"{interval_text(diff)}; seed noise {100 * noise:.1f} points; "
                    f"run time fp32 / bf16 {speed:.2f}",
                    _yes(diff is not None and diff[0] >= -noise),
                )
            )
    return _targets_table("## Targets (bf16 against fp32, paired by seed)", rows, runs)


def _targets_table(title: str, rows: list[tuple[str, str, str]], runs: list[Run]) -> list[str]:
    """A targets section: ``rows`` of (target, measured, met) and the study's wall time."""
    minutes = study_seconds(runs) / 60
    rows = [
        *rows,
        ("the whole study under 90 minutes on 2 cores", f"{minutes:.0f} min", _yes(minutes < 90)),
    ]
    out = [title, "", "| target | measured | met |", "|---|---|---|"]
    return out + [f"| {a} | {b} | {c} |" for a, b, c in rows] + [""]


def interval_text(diff: tuple[float, float, int] | None) -> str:
    """A paired difference (:func:`paired`) as points with its 95 % interval."""
    if diff is None:
        return "n/a"
    mean, half, n = diff
    return (
        f"{100 * mean:+.1f} points [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}] "
        f"(95 %, {n} seeds)"
    )


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def method_curves(table: Table, group: str) -> dict[str, dict[int, float]]:
    """Method -> round -> the group's main score, mean over the method's seeds."""
    out = {}
    for method, runs in table.by_method.items():
        rounds: dict[int, list[float]] = defaultdict(list)
        for run in runs:
            for r, v in run.curves.get(group, {}).items():
                rounds[r].append(v)
        if rounds:
            out[method] = {r: statistics.mean(v) for r, v in sorted(rounds.items())}
    return out


def group_figure(figure: Path, group: str) -> Path:
    """Where a federation's figure of ``group`` goes: ``<figure>-<group>.png``."""
    return figure.with_name(figure.name + "-" + re.sub(r"[^\w.-]+", "_", group) + ".png")


def _plot(federation: str, table: Table, group: str) -> Figure:
    """One architecture group: every method's score per round (:func:`method_curves`), its
    chance level dashed (:meth:`Table.chance`)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    plain_ticks(ax)
    for method, curve in method_curves(table, group).items():
        ax.plot(list(curve), list(curve.values()), marker=".", label=method)
    if (level := table.chance(group)) is not None:
        ax.axhline(level, color="grey", linestyle="--", label="chance")
    ax.set(xlabel="round", ylabel=table.metrics[group][0], title=f"{group} (mean over seeds)")
    round_axis(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(federation, fontsize=9)
    return fig


def write_report(study_dir: Path, dest: Path, *, title: str, command: str) -> Path:
    """Write the report for the runs under ``study_dir`` to ``dest``; its figures, one per
    federation and architecture group and one of each classifying federation's pooled
    accuracy, go to ``figures/`` beside it, named ``<dest's stem>-<federation's index>-…``."""
    runs = collect(study_dir)
    if not runs:
        raise FileNotFoundError(f"no finished runs under {study_dir}")
    figures = dest.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    by_fed = by_federation(runs)
    stems = {f: figures / f"{dest.stem}-{i}" for i, f in enumerate(sorted(by_fed))}
    splits = {run.eval_split for run in runs}
    if len(splits) > 1:
        raise ValueError(f"{study_dir} mixes runs scored on {sorted(splits)}; report them apart")
    on_test = splits != {"validation"}
    pooled = {run.split for run in runs} == {"pooled"}
    scored_on = {
        "test": "each client's test examples, a uniform sample of the test split",
        "local": "each client's test examples, drawn with its training partition's label "
        "distribution as personalised FL scores a client (`eval_split=local`); the second "
        "number of a cell (`global_…`) is the same model on a uniform sample of the test split",
        "validation": "each client's validation examples, training rows that no client trains on",
    }[next(iter(splits))]
    if pooled and on_test:  # HtFLlib's split: no shared test set
        scored_on = (
            "each client's own test rows (`federation.split=pooled`: its share of the dataset's "
            "train and test rows pooled, cut at random into its train, validation and test rows)"
        )
    precisions = {r.bf16 for r in runs}
    computed = "fp32, and bf16 (autocast) where a method says so"
    if len(precisions) == 1:
        computed = "bf16 (autocast)" if precisions.pop() else "fp32"
    lines = [
        f"# {title}",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')} from {len(runs)} runs in "
        f"`{study_dir.name}/`. Scores are the final round's evaluation on {scored_on} "
        "(accuracy; for QA F1, the main score, and EM), weighted by examples within "
        "a group; ± is the standard deviation over seeds. Nothing was tuned on the test "
        "split: settings that differ from the config's defaults are named in the method. "
        "Bytes per round are all clients' messages, down and up, averaged over rounds; "
        "'vs FedAvg full' compares with FedAvg sending every client's whole model both ways. "
        "Client overhead is MergeNet's client-side time (install, packet, gradient pieces) "
        f"over local training time. Clients computed in {computed}.",
        "",
        *(targets_section(runs) if on_test else []),
        *pooled_section(runs, stems),
        *field_section(runs),
        "## Per federation",
        "",
    ]
    for federation, fed_runs in sorted(by_fed.items()):
        lines += federation_section(federation, fed_runs, stems[federation])
    dest.write_text("\n".join(lines), encoding="utf-8")
    return dest
