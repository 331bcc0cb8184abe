"""What a run leaves on disk, for any Flower app: enable it with one line,

    strategy = MergeNet(..., on_round=RunLog("outputs/my-run"))

``<run dir>/metrics.jsonl``  one line per (round, stage, client), plus dropped clients
``<run dir>/summary.md``     final metrics per architecture group, bytes, wall time
``<run dir>/accuracy.png``   accuracy (or F1) per round per group, chance marked
``<run dir>/bytes.png``      bytes sent and received per round
``<run dir>/transfer.png``   MergeNet only: who learns from whom (transfer effect, attention)

The summary and plots are written when the run's last stage is in (and by :func:`summarize`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

matplotlib.use("Agg")  # files only, no display

NO_BYTES = "no parameters travel in this run"

log = logging.getLogger(__name__)

SCORE_KEYS = ("accuracy", "f1", "em")  # the first one a group reports is its score
ONE_CLASS = 0.95  # a client whose predictions fall this much in one class is flagged


class RunLog:
    """A strategy's ``on_round`` sink: appends JSON lines as rounds finish, and writes
    ``summary.md`` and the plots once the run's last stage is in (``summary=False``: the caller
    writes them with :func:`summarize`). ``groups``: the federation's architecture groups, to
    name any that never reported. A folder that holds an earlier run's lines starts afresh,
    unless ``append`` (a resumed run)."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        title: str = "run",
        groups: Sequence[str] = (),
        summary: bool = True,
        append: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if not append:
            self.path.unlink(missing_ok=True)
        self.title, self.groups, self.summary = title, tuple(groups), summary
        self.started = time.perf_counter()

    def __call__(self, record: dict[str, Any]) -> None:
        head = {"round": record["round"], "stage": record["stage"]}
        lines = [
            {**head, "client": cid, "seconds": round(time.perf_counter() - self.started, 3), **v}
            for cid, v in sorted(record["clients"].items())
        ]
        groups = record.get("dropped_groups", {})
        lines += [
            {**head, "client": c, "dropped": r, **({"group": groups[c]} if c in groups else {})}
            for c, r in sorted(record["dropped"].items())
        ]
        for key in ("absent", "server"):
            if record.get(key):
                lines.append({**head, key: record[key]})
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        if self.summary and record.get("final"):
            seconds = time.perf_counter() - self.started
            path = summarize(self.run_dir, self.title, seconds, self.groups)
            log.info("run summary: %s", path)

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


def pooled_curve(
    lines: list[dict[str, Any]], metric: str = "accuracy", weight: str = "num-examples"
) -> dict[int, float]:
    """Round -> ``metric`` pooled over every client that reported it: all correct over all
    scored when ``metric`` is an accuracy and ``weight`` its example count (HtFLlib's number;
    ``val_accuracy`` with ``val_num_examples``: the validation rows')."""
    sums: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for line in lines:
        if line.get("stage") == "evaluate" and metric in line and line.get(weight, 0) > 0:
            sums[line["round"]][0] += line[metric] * line[weight]
            sums[line["round"]][1] += line[weight]
    return {r: s / n for r, (s, n) in sorted(sums.items())}


def bytes_per_round(lines: list[dict[str, Any]]) -> dict[int, tuple[int, int]]:
    """Round -> (bytes down, bytes up) over all clients, train stage."""
    out: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for line in lines:
        if line.get("stage") == "train" and "bytes_down" in line:
            out[line["round"]][0] += int(line["bytes_down"])
            out[line["round"]][1] += int(line["bytes_up"])
    return {r: (d, u) for r, (d, u) in sorted(out.items())}


def summarize(run_dir: Path, title: str, seconds: float, groups: Sequence[str] = ()) -> Path:
    """Write ``summary.md`` and the plots; return the summary's path.

    ``groups`` are the federation's architecture groups: any of them without a single
    evaluation is listed as missing, with the reasons its clients were dropped.
    """
    lines = read_lines(run_dir)
    curves = group_curves(lines)
    chance = chance_levels(lines)
    traffic = bytes_per_round(lines)
    text = "\n".join(
        [
            f"# {title}",
            "",
            f"Wall time: {seconds:.1f} s. Rounds: {max(traffic, default=0)}.",
            f"Bytes: {sum(d for d, _ in traffic.values()):,} down, "
            f"{sum(u for _, u in traffic.values()):,} up (all clients, all rounds).",
            f"Dropped replies: {sum('dropped' in line for line in lines)}.",
            "",
            "Final evaluation per architecture group (example-weighted); chance is the score of "
            "always predicting the most frequent label (for QA: always 'no answer'):",
            "",
            *score_table(lines, curves, chance),
            *missing_groups(lines, groups),
            *one_class_flags(lines),
            "Training examples per class, per client:",
            "",
            *label_table(lines),
            "",
            "Plots: `accuracy.png` (score per round per group, chance dashed), `bytes.png` (bytes "
            "per round)"
            + (", `transfer.png` (who learns from whom)." if transfers(lines) else "."),
            "Per-round, per-client numbers: `metrics.jsonl`.",
            "",
        ]
    )
    (run_dir / "summary.md").write_text(text, encoding="utf-8")
    save_figure(curves_figure(curves, chance, title), run_dir / "accuracy.png")
    save_figure(bytes_figure(traffic, title), run_dir / "bytes.png")
    if transfers(lines):
        save_figure(transfer_figure(transfers(lines), title), run_dir / "transfer.png")
    return run_dir / "summary.md"


def chance_levels(lines: list[dict[str, Any]]) -> dict[str, float]:
    """Group -> its chance level at its last evaluation (example-weighted over its clients).

    Groups whose evaluations carry no ``chance`` (runs from before it was reported) are left
    out.
    """
    return {g: list(c.values())[-1] for g, c in group_curves(lines, "chance").items() if c}


def _last_evaluations(lines: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Group -> client -> its last evaluation line."""
    last: dict[str, dict[str, dict[str, Any]]] = {}
    for line in lines:
        if line.get("stage") == "evaluate" and "group" in line and "dropped" not in line:
            last.setdefault(line["group"], {})[line["client"]] = line
    return last


def score_table(
    lines: list[dict[str, Any]],
    curves: dict[str, dict[int, float]],
    chance: dict[str, float],
) -> list[str]:
    """The final score of each evaluated group with its chance level beside it (and, where
    clients were scored on their local test, the global test's in two more columns)."""
    evaluations = sorted(_last_evaluations(lines).items())
    both = any(f"global_{k}" in m for _, ms in evaluations for m in ms.values() for k in SCORE_KEYS)
    extra = " global | global chance |" if both else ""
    rows = [
        "| group | clients | score | final | chance | loss |" + extra,
        "|---|---:|---|---:|---:|---:|" + ("---:|---:|" if both else ""),
    ]
    for group, members in evaluations:
        first = next(iter(members.values()))
        key = next((k for k in SCORE_KEYS if k in first), "n/a")
        final = f"{list(curves[group].values())[-1]:.4f}" if curves.get(group) else "n/a"
        level = f"{chance[group]:.4f}" if group in chance else "n/a"
        losses = [m["loss"] for m in members.values() if "loss" in m]
        loss = f"{sum(losses) / len(losses):.4f}" if losses else "n/a"
        row = f"| {group} | {len(members)} | {key} | {final} | {level} | {loss} |"
        if both:
            row += "".join(f" {_weighted_mean(members, f'global_{k}')} |" for k in (key, "chance"))
        rows.append(row)
    return rows + [""]


def _weighted_mean(members: dict[str, dict[str, Any]], metric: str) -> str:
    """``metric`` over a group's last evaluations, weighted by their examples ("n/a": none)."""
    pairs = [
        (m[metric], max(m.get("num-examples", 1.0), 1.0)) for m in members.values() if metric in m
    ]
    if not pairs:
        return "n/a"
    return f"{sum(v * n for v, n in pairs) / sum(n for _, n in pairs):.4f}"


def missing_groups(lines: list[dict[str, Any]], groups: Sequence[str]) -> list[str]:
    """Lines naming each group in ``groups`` that never trained or was never evaluated (not one
    successful reply of any of its clients), and why its clients were dropped."""
    done = {
        stage: {
            x["group"]
            for x in lines
            if x.get("stage") == stage and "group" in x and "dropped" not in x
        }
        for stage in ("train", "evaluate")
    }
    missing = [g for g in groups if g not in done["train"] or g not in done["evaluate"]]
    if not missing:
        return []
    out = ["**Missing groups** (no client of the group trained, or none was evaluated):", ""]
    for group in missing:
        reasons = {x["dropped"] for x in lines if "dropped" in x and x.get("group") == group}
        reasons = reasons or {x["dropped"] for x in lines if "dropped" in x and "group" not in x}
        out.append(f"- {group}: " + ("; ".join(sorted(reasons)) or "no reply at all"))
    return out + [""]


def one_class_flags(lines: list[dict[str, Any]]) -> list[str]:
    """Lines flagging each client whose last evaluation puts nearly every prediction in one
    class (a model stuck on its majority class looks like a normal curve otherwise)."""
    flags = [
        f"- **{cid}** ({group}) predicts one class for ~everything: {m['top_share']:.2f} of its "
        "evaluation predictions (QA: 'no answer')"
        for group, members in sorted(_last_evaluations(lines).items())
        for cid, m in sorted(members.items())
        if m.get("top_share", 0.0) >= ONE_CLASS
    ]
    return (["Clients stuck on one class:", "", *flags, ""]) if flags else []


def label_table(lines: list[dict[str, Any]]) -> list[str]:
    """Training examples per class (columns) of each client, from its latest train line."""
    counts = {
        x["client"]: (x["group"], x["label_counts"])
        for x in lines
        if x.get("stage") == "train" and "label_counts" in x
    }
    if not counts:
        return ["(not reported)"]
    width = max(len(c) for _, c in counts.values())
    rows = ["| client | group | " + " | ".join(str(i) for i in range(width)) + " |"]
    rows.append("|---|---|" + "---:|" * width)
    for cid, (group, c) in sorted(counts.items()):
        cells = [str(int(v)) for v in c] + [""] * (width - len(c))  # fewer classes: blank
        rows.append(f"| {cid} | {group} | " + " | ".join(cells) + " |")
    return rows


def transfers(lines: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """Target group -> transfer round -> ``effect`` (mean ``transfer_effect`` of its target
    layers) and ``from <group>`` (mean attention share it gave each source group)."""
    groups = {x["client"]: x["group"] for x in lines if "group" in x and "client" in x}
    out: dict[str, dict[int, dict[str, list[float]]]] = defaultdict(dict)
    for line in lines:
        targets = line.get("server", {}).get("targets") if line.get("stage") == "train" else None
        for cid, layers in (targets or {}).items():
            stats = out[groups.get(cid, cid)].setdefault(line["round"], defaultdict(list))
            for layer in layers.values():
                stats["effect"].append(layer["transfer_effect"])
                for source, share in layer["attention"].items():
                    stats[f"from {source}"].append(share)
    return {
        g: {r: {k: sum(v) / len(v) for k, v in s.items()} for r, s in rounds.items()}
        for g, rounds in out.items()
    }


def round_axis(ax: plt.Axes) -> None:
    """Whole rounds on the x axis, also when there is a single one."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def plain_ticks(ax: plt.Axes) -> None:
    """Tick labels that are the numbers themselves: with matplotlib's offset ("+1e-7") or
    ×10ⁿ factor, a constant series whose means differ in the 7th digit looks jagged. Call it
    before any tick labels of one's own (it needs the default formatter)."""
    ax.ticklabel_format(style="plain", useOffset=False)


def save_figure(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curves_figure(
    curves: dict[str, dict[int, float]], chance: dict[str, float], title: str
) -> Figure:
    """Score per round per group; each group's chance level dashed in its colour."""
    fig, ax = plt.subplots(figsize=(6, 4))
    plain_ticks(ax)
    for group, points in sorted(curves.items()):
        (line,) = ax.plot(list(points), list(points.values()), marker="o", label=group)
        if group in chance:
            ax.axhline(
                chance[group],
                color=line.get_color(),
                linestyle="--",
                linewidth=1,
                label=f"{group} chance",
            )
    ax.set(xlabel="round", ylabel="accuracy / F1 (dashed: chance)", title=title)
    round_axis(ax)
    if curves:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def bytes_note(traffic: dict[int, tuple[int, int]]) -> str | None:
    """What ``bytes.png`` says instead of bars: :data:`NO_BYTES` when nothing travelled
    (LocalOnly), else None."""
    return None if any(d + u for d, u in traffic.values()) else NO_BYTES


def bytes_figure(traffic: dict[int, tuple[int, int]], title: str) -> Figure:
    """Bytes per round, down and up; :func:`bytes_note` instead where nothing travelled."""
    fig, ax = plt.subplots(figsize=(6, 4))
    plain_ticks(ax)
    ax.yaxis.set_major_formatter(EngFormatter(unit="B"))  # "250 kB", not "2.5" and "1e5"
    rounds = list(traffic)
    if note := bytes_note(traffic):
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)
    else:
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
        ax.legend(fontsize=8)
    ax.set(xlabel="round", ylabel="bytes", title=title)
    round_axis(ax)
    ax.grid(alpha=0.3, axis="y")
    return fig


def transfer_figure(stats: dict[str, dict[int, dict[str, float]]], title: str) -> Figure:
    """Per target group: its transfer effect, and the attention share of each source group."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax in axes:
        plain_ticks(ax)
    for group, rounds in sorted(stats.items()):
        xs = list(rounds)
        axes[0].plot(xs, [rounds[r]["effect"] for r in xs], label=group)
        for key in sorted({k for r in rounds.values() for k in r if k.startswith("from ")}):
            ys = [rounds[r].get(key, float("nan")) for r in xs]
            # shares of 0 or 1 sit on the frame: drawn over it rather than half hidden
            axes[1].plot(xs, ys, marker=".", clip_on=False, label=f"{group} ← {key[5:]}")
    axes[0].set(xlabel="round", ylabel="transfer effect", title="how much the others change it")
    axes[1].set(xlabel="round", ylabel="attention share", title="who learns from whom")
    axes[1].set_ylim(0, 1)  # shares of a whole: the same scale in every run and round
    for ax in axes:
        round_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig
