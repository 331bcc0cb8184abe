"""The study report is computed from run folders; here from hand-made ones with known numbers."""

import json
import os
import re
import shutil

import pytest
from omegaconf import OmegaConf

from simulations import report
from simulations.report import Table, collect, method_curves, study_seconds, write_report


def fake_run(
    root,
    name,
    strategy,
    seed,
    scores,
    share="unselected",
    variant="lpka",
    qa=None,
    chance=None,
    on_global=None,
    hub=None,
    install=None,
    trace=None,
    **top,
):
    """A finished run of one image group ``r8`` (and a QA group ``qa`` if given: round ->
    (f1, em)) with the given accuracy per round and, if given, ``r8``'s chance level and its
    (accuracy, chance) on the global test (``on_global``, every round); ``top`` sets top-level
    config keys, and ``lr``, ``optimizer`` and ``source`` the strategy's; ``hub``: the final
    accuracy of a send-only group ``hub`` beside them (every round); ``install``: round ->
    the ``r8`` clients' probe_install gains (own test, global test); ``trace``: round ->
    (transfer effect, attention to ``hub``, adapter step norm) in the server's log, where the
    hub, a target too, attends to nothing of itself."""
    run = root / name
    run.mkdir(parents=True)
    clients = [
        {
            "group": "r8",
            "task": "image_classification",
            "arch": "resnet8",
            "dataset": "cifar10",
            "layers": ["fc"],
        }
    ]
    if qa:
        clients.append(
            {
                "group": "qa",
                "task": "extractive_qa",
                "arch": "distilbert_tiny_qa",
                "dataset": "squad2",
                "layers": ["qa_outputs"],
            }
        )
    if hub is not None:
        clients.append(
            {
                "group": "hub",
                "task": "image_classification",
                "arch": "resnet8_f512",
                "dataset": "cifar10",
                "layers": ["fc"],
                "send_only": True,
                "frozen": True,
                "examples": 1000,
                "local_steps": 20,
            }
        )
    cfg = {
        "seed": seed,
        "transfer_every": 1,
        "rank": top.pop("rank", 8),
        "strategy": {
            "name": strategy,
            "share": share,
            "lr": top.pop("lr", 0.00001),
            "optimizer": top.pop("optimizer", "adam"),
            "source": top.pop("source", "real"),
        },
        "adapter": {"variant": variant},
        "federation": {
            "clients": [{**c, "count": 2} for c in clients[:1]] + clients[1:],
            "examples_per_client": 100,
            "partition": "dirichlet",
            "alpha": 0.1,
        },
        **top,
    }
    OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
    lines = []
    for rnd, score in enumerate(scores, 1):
        for client in ("a", "b"):
            lines.append(
                {
                    "round": rnd,
                    "stage": "train",
                    "client": client,
                    "group": "r8",
                    "num-examples": 10,
                    "train_seconds": 1.0,
                    "mergenet_seconds": 0.02,
                    "bytes_down": 100,
                    "bytes_up": 300,
                    **(
                        {}
                        if install is None
                        else dict(
                            zip(("install_gain", "install_gain_global"), install[rnd], strict=True)
                        )
                    ),
                }
            )
            lines.append(
                {
                    "round": rnd,
                    "stage": "evaluate",
                    "client": client,
                    "group": "r8",
                    "num-examples": 10,
                    "accuracy": score,
                    "loss": 1.0,
                    **({} if chance is None else {"chance": chance}),
                    **(
                        {}
                        if on_global is None
                        else {"global_accuracy": on_global[0], "global_chance": on_global[1]}
                    ),
                }
            )
        if trace is not None:
            effect, attention, step = trace[rnd]
            stats = {
                "transfer_effect": effect,
                "attention": {"hub": attention, "r8": 1 - attention},
            }
            alone = {"transfer_effect": 9.0, "attention": {"hub": 0.0, "r8": 1.0}}
            targets = {"a": {"fc": stats}, "b": {"fc": stats}, "h": {"fc": alone}}
            lines.append(
                {"round": rnd, "stage": "train", "server": {"targets": targets, "step_norm": step}}
            )
        if hub is not None:
            lines.append(
                {
                    "round": rnd,
                    "stage": "evaluate",
                    "client": "h",
                    "group": "hub",
                    "num-examples": 10,
                    "accuracy": hub,
                }
            )
        if qa:
            f1, em = qa[rnd]
            lines.append(
                {
                    "round": rnd,
                    "stage": "evaluate",
                    "client": "q",
                    "group": "qa",
                    "f1": f1,
                    "em": em,
                }
            )
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "run.json").write_text(json.dumps({"seconds": 12.0}))


def report_text(study, dest) -> str:
    """Write the report of ``study`` to ``dest`` and return its text."""
    write_report(study, dest, title="T", command="cmd")
    return dest.read_text()


def saved_figures(monkeypatch) -> dict:
    """File name -> Figure, of every figure the report writes from now on (as written)."""
    saved = {}
    save = report.save_figure

    def keep(fig, path):
        saved[path.name] = fig
        save(fig, path)

    monkeypatch.setattr(report, "save_figure", keep)
    return saved


def test_report_means_gains_bytes_and_overhead(tmp_path):
    study = tmp_path / "study"
    for seed, (local, merged) in enumerate([(0.20, 0.30), (0.22, 0.26)]):
        fake_run(study, f"local{seed}", "local", seed, [0.1, local], share="none")
        fake_run(study, f"merge{seed}", "mergenet", seed, [0.1, merged])
    (study / "unfinished").mkdir()
    OmegaConf.save(OmegaConf.create({}), study / "unfinished" / "config.yaml")
    runs = collect(study)
    assert sorted(r.method for r in runs) == [
        "LocalOnly",
        "LocalOnly",
        "MergeNet (lpka)",
        "MergeNet (lpka)",
    ]
    merge = next(r for r in runs if r.method == "MergeNet (lpka)")
    assert merge.bytes_per_round == 800 and abs(merge.overhead - 0.02) < 1e-9

    text = report_text(study, tmp_path / "docs" / "results.md")
    assert "| LocalOnly | 2 | 21.0 ± 1.4 |" in text
    assert "| MergeNet (lpka) | 2 | 28.0 ± 2.8 |" in text
    assert "- MergeNet (lpka): r8 +7.0 ± 2.8" in text
    assert "2.0 %" in text  # client overhead
    assert (tmp_path / "docs" / "figures" / "results-0-r8.png").stat().st_size > 0
    assert "| chance (always the most frequent label; QA: always 'no answer') | | – |" in text


def test_report_checks_the_targets(tmp_path):
    study = tmp_path / "study"
    finals = {  # method -> final accuracy per seed
        ("local", "lpka"): (0.20, 0.22),
        ("groupfedavg", "lpka"): (0.23, 0.25),
        ("mergenet", "lpka"): (0.30, 0.26),
        ("mergenet", "avg"): (0.27, 0.27),
        ("mergenet", "rows"): (0.25, 0.25),
        ("mergenet", "mlp"): (0.26, 0.26),  # beats rows: the paper's order does not hold
    }
    for (strategy, variant), scores in finals.items():
        for seed, final in enumerate(scores):
            name = f"{strategy}-{variant}-{seed}"
            fake_run(study, name, strategy, seed, [0.1, final], variant=variant)
    text = report_text(study, tmp_path / "results.md")
    assert "| MergeNet (lpka) ≥ LocalOnly + 2 points, image groups | +7.0 points | yes |" in text
    assert "| MergeNet (lpka) ≥ GroupFedAvg + 1 point, image groups | +4.0 points | yes |" in text
    assert "| none worse | yes |" in text
    assert "Clients computed in fp32." in text  # no run says bf16
    assert "lpka 28.0, avg 27.0, rows 25.0, mlp 26.0 | **no** |" in text
    assert "| 2.0 % | yes |" in text
    # 800 bytes per round against two ResNet-8s sent both ways in float32
    assert re.search(r"\| MergeNet \(lpka\): 1/[\d,]+ \| yes \|", text)


def test_report_shows_f1_and_em_for_qa(tmp_path):
    study = tmp_path / "study"
    fake_run(study, "a", "local", 0, [0.1, 0.2], qa={1: (0.1, 0.0), 2: (0.40, 0.25)})
    fake_run(study, "b", "local", 1, [0.1, 0.2], qa={1: (0.1, 0.0), 2: (0.50, 0.35)})
    text = report_text(study, tmp_path / "results.md")
    assert "| qa (f1 / em) | r8 (accuracy) |" in text
    assert "| LocalOnly | 2 | 45.0 ± 7.1 / 30.0 ± 7.1 | 20.0 ± 0.0 | 32.5 |" in text


def test_study_time_sums_each_sweeps_span(tmp_path):
    study = tmp_path / "study"
    ends = {"sweep1/a": 1000.0, "sweep1/b": 1100.0, "sweep2/c": 5000.0}
    for i, (name, end) in enumerate(ends.items()):
        fake_run(study, name, "local", i, [0.1, 0.2])
        os.utime(study / name / "run.json", (end, end))
    # sweep1: from 1000 - 12 to 1100; sweep2: one run of 12 s; the gap between them is left out
    assert study_seconds(collect(study)) == pytest.approx(112 + 12)


def test_validation_report_names_its_split_and_non_default_settings(tmp_path):
    study = tmp_path / "study"
    for seed in (0, 1):
        fake_run(study, f"l{seed}", "local", seed, [0.1, 0.2], eval_split="validation")
        settings = {"default": {}, "lr": {"lr": 0.1}, "rank": {"rank": 10}}
        settings["sgd"] = {"optimizer": "sgd", "lr": 1.0}
        for name, changed in settings.items():
            run = f"{name}-{seed}"
            fake_run(study, run, "mergenet", seed, [0.1, 0.2], eval_split="validation", **changed)
    text = report_text(study, tmp_path / "results.md")
    assert "| MergeNet (lpka, rank 10) | 2 |" in text
    assert "| MergeNet (lpka, optimizer sgd, lr 1) | 2 |" in text
    assert "validation examples, training rows that no client trains on" in text
    assert "| MergeNet (lpka) | 2 |" in text and "| MergeNet (lpka, lr 0.1) | 2 |" in text
    assert "## Targets" not in text  # the targets are about test scores

    fake_run(study, "on-test", "local", 5, [0.1, 0.2])
    with pytest.raises(ValueError, match=r"mixes runs scored on \['test', 'validation'\]"):
        report_text(study, tmp_path / "results.md")


def test_paper_study_reports_paired_intervals_and_the_papers_targets(tmp_path):
    study = tmp_path / "study"
    finals = {  # method -> final accuracy per seed: lpka beats LocalOnly by 2, 3 and 4 points
        ("local", "lpka"): (0.50, 0.52, 0.48),
        ("mergenet", "lpka"): (0.52, 0.55, 0.52),
        ("mergenet", "avg"): (0.51, 0.53, 0.50),
        ("mergenet", "rows"): (0.50, 0.52, 0.49),
        ("mergenet", "mlp"): (0.49, 0.51, 0.47),
    }
    for (strategy, variant), scores in finals.items():
        lr = {"lr": 1e-6} if strategy == "mergenet" else {}  # named in the label: still found
        for seed, final in enumerate(scores):
            name = f"{strategy}-{variant}-{seed}"
            fake_run(study, name, strategy, seed, [0.1, final], variant=variant, **lr)
    text = report_text(study, tmp_path / "results-paper.md")
    # differences 2, 3, 4: mean 3, std 1, t(0.975, 2) = 4.303: half-width 2.48
    assert "- MergeNet (lpka, lr 1e-06): r8 +3.0 [+0.5, +5.5]" in text
    assert (
        "| MergeNet (lpka, lr 1e-06) ≥ LocalOnly + 1 point: r8 | "
        "+3.0 points [+0.5, +5.5] (95 %, 3 seeds) | yes |" in text
    )
    assert "lpka 53.0, avg 51.3, rows 50.3, mlp 49.0 | yes |" in text
    assert "| both models far above chance: LocalOnly ≥ 45 % | lowest 50.0 % | yes |" in text


def test_each_group_has_a_figure_with_every_methods_mean_curve_and_chance(tmp_path):
    study = tmp_path / "study"
    qa = {1: (0.1, 0.0), 2: (0.4, 0.2)}
    for seed, (local, merged) in enumerate([(0.2, 0.3), (0.4, 0.5)]):
        chance = 0.1 + 0.1 * seed
        fake_run(study, f"l{seed}", "local", seed, [0.1, local], qa=qa, chance=chance)
        fake_run(study, f"m{seed}", "mergenet", seed, [0.2, merged], qa=qa, chance=chance)
    text = report_text(study, tmp_path / "results.md")
    assert "| qa (f1 / em) | r8 (accuracy) |" in text
    # chance beside each group: r8's mean over its runs; qa's runs report none
    assert (
        "| chance (always the most frequent label; QA: always 'no answer') | | – | 15.0 |" in text
    )
    for group in ("qa", "r8"):
        assert (tmp_path / "figures" / f"results-0-{group}.png").stat().st_size > 0
        assert f"](figures/results-0-{group}.png)" in text
    assert not (tmp_path / "figures" / "results-0.png").exists()

    table = Table.of(collect(study))
    assert method_curves(table, "r8") == {
        "LocalOnly": {1: pytest.approx(0.1), 2: pytest.approx(0.3)},
        "MergeNet (lpka)": {1: pytest.approx(0.2), 2: pytest.approx(0.4)},
    }
    assert list(method_curves(table, "qa")) == ["LocalOnly", "MergeNet (lpka)"]
    assert table.chance("r8") == pytest.approx(0.15) and table.chance("qa") is None


def test_benchmark_report_shows_both_test_splits_and_ranks_the_fields_methods(tmp_path):
    study = tmp_path / "study"
    finals = {  # strategy -> final local accuracy (seeds 0, 1); the global test scores 0.3
        "local": (0.60, 0.62),
        "fedkd": (0.70, 0.72),
        "fd": (0.66, 0.68),
        "fml": (0.64, 0.66),
        "lgfedavg": (0.62, 0.64),
        "fedproto": (0.58, 0.60),
        "mergenet": (0.69, 0.69),
    }
    for strategy, scores in finals.items():
        for seed, score in enumerate(scores):
            fake_run(
                study,
                f"{strategy}{seed}",
                strategy,
                seed,
                [0.1, score],
                share="none",
                chance=0.5,
                on_global=(0.3, 0.1),
                eval_split="local",
                num_rounds=2,
                local_steps=4,
                batch_size=32,
            )
    text = report_text(study, tmp_path / "benchmark.md")
    assert "r8 (accuracy / global_accuracy)" in text
    assert "| FedKD | 2 | 71.0 ± 1.4 / 30.0 ± 0.0 |" in text
    assert (
        "| chance (always the most frequent label; QA: always 'no answer') | | 50.0 / 10.0 |"
        in text
    )
    assert "second number of a cell (`global_…`)" in text
    ranked = re.findall(r"^- (.+): ([+-]\d+\.\d)$", text, flags=re.M)
    assert ranked[:3] == [
        ("FedKD", "+10.0"),
        ("MergeNet (lpka, transfer only)", "+8.0"),
        ("FD", "+6.0"),
    ]
    assert (
        "| MergeNet (lpka, transfer only) ≥ the best baseline (FedKD) | +8.0 vs +10.0 | **no** |"
        in text
    )
    assert (
        "FedKD > FD > FML > LG-FedAvg > FedProto) | FedKD > FD > FML > LG-FedAvg > FedProto | yes |"
        in text
    )
    assert "How far this is from HtFLlib's regime: here 2 clients" in text
    assert "100 training examples each (Dirichlet 0.1), 2 rounds of 4 batches of 32" in text


def pooled_run(root, name, strategy, seed, rounds):
    """Two clients of one group with 30 and 10 test rows: ``rounds`` is per round
    ``(accuracy a, accuracy b, validation accuracy a, validation accuracy b)``, the
    validation rows 4 and 4; each client trains 5 steps a round."""
    run = root / name
    run.mkdir(parents=True)
    clients = [
        {
            "group": "r8",
            "task": "image_classification",
            "arch": "resnet8",
            "dataset": "cifar10",
            "layers": ["fc"],
            "count": 2,
        }
    ]
    cfg = {
        "seed": seed,
        "transfer_every": 1,
        "rank": 8,
        "num_rounds": 3,
        "batch_size": 10,
        "strategy": {"name": strategy},
        "adapter": {"variant": "lpka"},
        "federation": {
            "clients": clients,
            "examples_per_client": 100,
            "partition": "dirichlet",
            "alpha": 0.1,
            "split": "pooled",
        },
    }
    OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
    lines = []
    for rnd, (acc_a, acc_b, val_a, val_b) in enumerate(rounds, 1):
        for client, n, acc, val in (("a", 30, acc_a, val_a), ("b", 10, acc_b, val_b)):
            lines.append(
                {
                    "round": rnd,
                    "stage": "train",
                    "client": client,
                    "group": "r8",
                    "num-examples": 100,
                    "train_seconds": 1.0,
                    "train_steps": 5,
                }
            )
            lines.append(
                {
                    "round": rnd,
                    "stage": "evaluate",
                    "client": client,
                    "group": "r8",
                    "num-examples": n,
                    "accuracy": acc,
                    "loss": 1.0,
                    "chance": 0.5,
                    "val_accuracy": val,
                    "val_num_examples": 4,
                }
            )
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "run.json").write_text(json.dumps({"seconds": 12.0}))


def pooled_study(study):
    """LocalOnly, FedTGP and FedGH at seeds 0 and 1 (:func:`pooled_run`): pooled per round
    = (30·a + 10·b) / 40; validation pooled = (val a + val b) / 2."""
    local = [(0.4, 0.8, 0.9, 0.9), (0.8, 0.2, 0.1, 0.1), (0.5, 0.5, 0.2, 0.2)]
    for seed, shift in enumerate((0.0, 0.04)):
        pooled_run(study, f"local{seed}", "local", seed, local)
        better = [(a + 0.1 + shift, b, va, vb) for a, b, va, vb in local]
        pooled_run(study, f"tgp{seed}", "fedtgp", seed, better)
        clear = [(a + 0.2, b, va, vb) for a, b, va, vb in local]  # the same gain every seed
        pooled_run(study, f"gh{seed}", "fedgh", seed, clear)


def test_pooled_accuracy_counts_every_clients_rows_at_the_final_best_and_validation_round(
    tmp_path,
):
    study = tmp_path / "study"
    pooled_study(study)
    run = next(r for r in collect(study) if r.method == "LocalOnly" and r.seed == 0)
    assert run.pooled == pytest.approx({1: 0.5, 2: 0.65, 3: 0.5})
    assert run.steps_per_client == 15
    # the best round on test is 2; the validation rows choose round 1
    assert [run.pooled_at(c) for c in ("final", "best", "validation")] == pytest.approx(
        [0.5, 0.65, 0.5]
    )
    text = report_text(study, tmp_path / "pooled.md")
    assert "evaluation on each client's own test rows (`federation.split=pooled`" in text
    assert "## Pooled accuracy, HtFLlib's number" in text
    # FedTGP gains 0.075 and 0.105 (30/40 of 0.14) over LocalOnly: mean 9.0, stdev 2.12
    row = next(line for line in text.splitlines() if line.startswith("| FedTGP |"))
    assert (
        "| 59.0 ± 2.1 | 74.0 ± 2.1 | 59.0 ± 2.1 | [39.9, 78.1] |" in row
        and "+9.0 ± 19.1 (n=2)" in row
        and row.endswith("| 15 |")
    )
    # FedTGP's half-width 19.1, FedGH's 0.0 (the same gain at both seeds)
    assert (
        "Resolution (half-width of the paired 95 % interval of final pooled accuracy against "
        "LocalOnly): median 9.5 points over 2 methods, ≤ 1.5 for 1 of them; widest 19.1 (FedTGP)."
    ) in text
    assert "Local steps per client: 15, 1/1513 of HtFLlib's ≥ 22,700" in text
    # FedGH gains 15.0 at both seeds (an interval of width 0); FedTGP's 19.1 covers 0, and so
    # does FedGH's lead over FedTGP (6.0 ± 19.1)
    separated = next(line for line in text.splitlines() if line.startswith("Pairs the"))
    assert separated.endswith("clear of 0): FedGH > LocalOnly (+15.0 ± 0.0).")


def test_pooled_accuracy_figure_plots_the_tables_means_and_intervals(tmp_path, monkeypatch):
    study = tmp_path / "study"
    pooled_study(study)
    saved = saved_figures(monkeypatch)
    text = report_text(study, tmp_path / "pooled.md")
    assert (tmp_path / "figures" / "pooled-0-pooled.png").stat().st_size > 0
    section = text.split("## Pooled accuracy")[1].split("\n## ")[0]
    assert "](figures/pooled-0-pooled.png)" in section  # under its section
    table = {}  # method -> (final mean, interval) in points, as the report writes them
    for row in (line for line in section.splitlines() if line.startswith("| ")):
        cells = [c.strip() for c in row.strip("|").split("|")]
        if bounds := re.fullmatch(r"\[(\S+), (\S+)\]", cells[5]):
            table[cells[0]] = (float(cells[2].split(" ± ")[0]), tuple(map(float, bounds.groups())))
    # FedTGP: 57.5 and 60.5, half-width t(0.975, 1) · stdev / √2 = 12.706 · 2.12 / 1.41 = 19.06
    assert table == {
        "LocalOnly": (50.0, (50.0, 50.0)),
        "FedTGP": (59.0, (39.9, 78.1)),
        "FedGH": (65.0, (65.0, 65.0)),
    }

    (ax,) = saved["pooled-0-pooled.png"].axes
    (bars,) = ax.containers
    points, _, (ranges,) = bars.lines
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["LocalOnly", "FedTGP", "FedGH"]  # worst at the bottom, best at the top
    assert list(points.get_ydata()) == [0, 1, 2]
    plotted = {
        m: (x, (lo[0], hi[0]))
        for m, x, (lo, hi) in zip(labels, points.get_xdata(), ranges.get_segments(), strict=True)
    }
    for method, (mean, interval) in table.items():
        assert plotted[method][0] == pytest.approx(mean, abs=0.05)
        assert plotted[method][1] == pytest.approx(interval, abs=0.05)
    marks = {line.get_label(): line.get_xdata()[0] for line in ax.get_lines()}
    assert marks["LocalOnly (mean)"] == pytest.approx(50) and marks["chance"] == pytest.approx(50)


def test_report_figures_show_plain_numbers(tmp_path, monkeypatch):
    study = tmp_path / "study"
    for seed in (0, 1):  # scores equal up to float noise: what matplotlib writes as an offset
        fake_run(study, f"l{seed}", "local", seed, [0.3, 0.3 + 1e-7], chance=0.3)
        fake_run(study, f"m{seed}", "mergenet", seed, [0.3, 0.3 + 2e-7], chance=0.3)
    saved = saved_figures(monkeypatch)
    report_text(study, tmp_path / "results.md")
    assert sorted(saved) == ["results-0-pooled.png", "results-0-r8.png"]
    offsets = {
        (name, axis.axis_name): axis.get_offset_text().get_text()
        for name, fig in saved.items()
        for axis in (fig.axes[0].xaxis, fig.axes[0].yaxis)
    }
    assert set(offsets.values()) == {""}, offsets


def test_reference_study_pairs_the_real_source_with_local_and_the_random_source(tmp_path):
    study = tmp_path / "study"
    finals = {  # final accuracy of the receiving group r8 per seed
        ("local", "real"): (0.50, 0.52, 0.48),
        ("mergenet", "real"): (0.52, 0.55, 0.52),  # +2, +3, +4 over LocalOnly
        ("mergenet", "random"): (0.52, 0.53, 0.51),  # real − random: 0, +2, +1
    }
    for (strategy, source), scores in finals.items():
        for seed, final in enumerate(scores):
            name = f"{strategy}-{source}-{seed}"
            fake_run(
                study,
                name,
                strategy,
                seed,
                [0.1, final],
                variant="reference",
                source=source,
                share="none",
                hub=0.6,
                chance=0.1,
            )
    text = report_text(study, tmp_path / "results-reference.md")
    assert (
        "| real source ≥ LocalOnly + 1 point: r8 | +3.0 points [+0.5, +5.5] (95 %, 3 seeds) "
        "| yes |" in text
    )
    # real − random: 0, 2, 1: mean 1, std 1, half-width 2.48
    assert (
        "| real source ≥ random source + 1 point: r8 | +1.0 points [-1.5, +3.5] (95 %, 3 seeds) "
        "| yes |" in text
    )
    assert "real source ≥ LocalOnly + 1 point: hub" not in text  # the send-only source


def test_hub_study_scores_the_data_poor_clients_and_the_hub_apart(tmp_path):
    study = tmp_path / "study"
    finals = {  # the data-poor group's final accuracy per seed
        ("local", "real"): (0.30, 0.32, 0.28),
        ("fd", "real"): (0.34, 0.36, 0.33),  # +4, +4, +5: clears LocalOnly
        ("fedproto", "real"): (0.30, 0.33, 0.27),  # -0, +1, -1: does not
        ("mergenet", "real"): (0.31, 0.34, 0.30),  # +1, +2, +2
        ("mergenet", "random"): (0.31, 0.32, 0.29),
    }
    # the merged layer alone, before training: round 1 (nothing merged yet) is left out
    install = {1: (0.9, 0.9), 2: (0.02, -0.01)}
    for (strategy, source), scores in finals.items():
        for seed, final in enumerate(scores):
            fake_run(
                study,
                f"{strategy}-{source}-{seed}",
                strategy,
                seed,
                [0.1, final],
                source=source,
                share="none",
                hub=0.7,
                chance=0.2,
                on_global=(final - 0.1, 0.1),
                eval_split="local",
                num_rounds=2,
                batch_size=10,
                install=install if strategy == "mergenet" and source == "real" else None,
                trace={1: (0.5, 0.9, 0.001), 2: (0.01, 0.6, 0.003)}
                if strategy == "mergenet"
                else None,
            )
    text = report_text(study, tmp_path / "results-hub.md")
    assert (
        "| MergeNet (lpka, transfer only): what the server's install does, scored before "
        "training (rounds 2 on; own test, global test) | +2.00 points / -1.00 points | – |"
    ) in text
    assert text.count("what the server's install does") == 1  # only where it was probed
    # the data-poor targets in the last round (not the hub's own); steps averaged
    assert (
        "| MergeNet (lpka, transfer only): the adapter (last round; steps: mean) | transfer "
        "effect 0.01, attention to the hub 0.600 (even spread 0.500), step norm 0.002 | – |"
    ) in text
    assert "## Targets (data-poor clients: r8; chance r8 20.0 %)" in text
    assert (
        "| the federation as run | the data-poor clients: 100 rows each, Dirichlet 0.1; hub: "
        "1000 rows, frozen, send-only (a method's own model on it trains 20 batches a round) "
        "| – |"
    ) in text
    assert report.partition_words({"partition": "iid", "alpha": 0.1}) == "IID"  # no alpha
    assert (
        "| a field method clears LocalOnly (interval above 0): the control works | FD +4.3" in text
    )
    assert "FedProto" not in text.split("the control works |")[1].split("|")[0]
    assert (
        "| MergeNet (lpka, transfer only) ≥ LocalOnly + 3 points | +1.7 points" in text
        and "(95 %, 3 seeds) | **no** |" in text
    )
    # best field method FD 34.3, MergeNet 31.7: 2.7 points below
    assert (
        "| MergeNet (lpka, transfer only) within 1 point of the best field method (FD) or above "
        "| -2.7 points | **no** |" in text
    )
    assert "| LocalOnly: data-poor clients | 30.0 %, global test 20.0 % | – |" in text
    assert "| the hub (hub), apart | 70.0 % | – |" in text


def test_precision_study_pairs_bf16_with_fp32_against_the_seed_noise(tmp_path):
    study = tmp_path / "study"
    finals = {  # r8's final accuracy per seed
        ("local", "fp32"): (0.50, 0.60, 0.55),  # seed noise: 5 points
        ("local", "bf16"): (0.49, 0.61, 0.53),  # -1, +1, -2: within it
        ("mergenet", "fp32"): (0.50, 0.52, 0.51),  # seed noise: 1 point
        ("mergenet", "bf16"): (0.45, 0.47, 0.46),  # -5 every seed: beyond it
    }
    for (strategy, precision), scores in finals.items():
        for seed, final in enumerate(scores):
            fake_run(
                study,
                f"{strategy}-{precision}-{seed}",
                strategy,
                seed,
                [0.1, final],
                share="none",
                chance=0.2,
                precision=precision,
            )
    # a run whose clients resolved precision=auto to bf16 says so in its replies
    auto = study / "mergenet-bf16-2"
    (auto / "config.yaml").write_text(
        (auto / "config.yaml").read_text().replace("precision: bf16", "precision: auto")
    )
    lines = [json.loads(x) for x in (auto / "metrics.jsonl").read_text().splitlines()]
    lines = [{**x, "bf16": 1} if x["stage"] == "train" else x for x in lines]
    (auto / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    text = report_text(study, tmp_path / "results-precision.md")
    assert "## Targets (bf16 against fp32, paired by seed)" in text
    assert "Clients computed in fp32, and bf16 (autocast) where a method says so." in text
    assert (
        "| r8: LocalOnly, bf16 − fp32 ≥ −seed noise (fp32 55.0 %, bf16 54.3 %, chance 20.0 %) "
        "| -0.7 points [-4.5, +3.1] (95 %, 3 seeds); seed noise 5.0 points; "
        "run time fp32 / bf16 1.00 | yes |"
    ) in text
    assert (
        "| r8: MergeNet (lpka, transfer only), bf16 − fp32 ≥ −seed noise (fp32 51.0 %, "
        "bf16 46.0 %, chance 20.0 %) | -5.0 points"
    ) in text
    assert "seed noise 1.0 points; run time fp32 / bf16 1.00 | **no** |" in text
    assert "| LocalOnly, bf16 | 3 |" in text  # the method's label names its precision
    # a study in one precision keeps the plain labels (its header names the precision)
    for run in study.glob("*-fp32-*"):
        shutil.rmtree(run)
    text = report_text(study, tmp_path / "results-bf16.md")
    assert "Clients computed in bf16 (autocast)." in text and "| LocalOnly | 3 |" in text
    assert "bf16 against fp32" not in text
