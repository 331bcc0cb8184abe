"""What a run leaves for a person: summary.md with chance, label counts and flags; plots."""

import json

import matplotlib.pyplot as plt
import pytest

from mergenet_fl.flower import runlog as results


def write(run_dir, lines):
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def evaluation(client, group, accuracy, chance=None, top_share=None, rnd=2, n=100):
    """An evaluate line; ``chance`` and ``top_share`` left out when None (runs before them)."""
    line = {
        "round": rnd,
        "stage": "evaluate",
        "client": client,
        "group": group,
        "num-examples": n,
        "loss": 1.0,
        "accuracy": accuracy,
    }
    extra = {"chance": chance, "top_share": top_share}
    return line | {k: v for k, v in extra.items() if v is not None}


def train(client, group, counts, rnd=1, **extra):
    return {
        "round": rnd,
        "stage": "train",
        "client": client,
        "group": group,
        "num-examples": sum(counts),
        "label_counts": counts,
        "bytes_down": 0,
        "bytes_up": 0,
        **extra,
    }


def dropped(client, reason, group=None, rnd=1):
    return {"round": rnd, "stage": "train", "client": client, "dropped": reason} | (
        {"group": group} if group else {}
    )


def summary(run_dir, lines, groups=()):
    write(run_dir, lines)
    return results.summarize(run_dir, "t", 1.0, groups).read_text()


def test_summary_shows_chance_beside_the_final_score(tmp_path):
    text = summary(
        tmp_path,
        [
            train("a", "cnn", [30, 10]),
            train("b", "bert", [5, 45]),
            evaluation("a", "cnn", 0.62, chance=0.5, top_share=0.5),
            evaluation("b", "bert", 0.52, chance=0.52, top_share=0.6),
        ],
        ["cnn", "bert"],
    )
    assert "| group | clients | score | final | chance | loss |" in text
    assert "| cnn | 1 | accuracy | 0.6200 | 0.5000 | 1.0000 |" in text
    assert "| bert | 1 | accuracy | 0.5200 | 0.5200 | 1.0000 |" in text
    assert "Wall time: 1.0 s. Rounds: 1." in text and "Dropped replies: 0." in text
    assert "Missing groups" not in text and "predicts one class" not in text
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert (tmp_path / "bytes.png").stat().st_size > 0


def test_clients_scored_on_their_local_test_show_the_global_test_beside_it(tmp_path):
    on_global = {"global_accuracy": 0.2, "global_chance": 0.1}
    lines = [
        train("a", "cnn", [30, 10]),
        train("b", "cnn", [10, 30]),
        evaluation("a", "cnn", 0.8, chance=0.75) | on_global,
        evaluation("b", "cnn", 0.7, chance=0.75, n=300) | on_global | {"global_accuracy": 0.4},
    ]
    text = summary(tmp_path, lines, ["cnn"])
    assert "| group | clients | score | final | chance | loss | global | global chance |" in text
    assert "| cnn | 2 | accuracy | 0.7250 | 0.7500 | 1.0000 | 0.3500 | 0.1000 |" in text


def test_chance_is_example_weighted_over_a_groups_clients_at_its_last_evaluation():
    lines = [
        evaluation("a", "cnn", 0.6, chance=0.9, rnd=1),
        evaluation("a", "cnn", 0.6, chance=0.5, n=100),
        evaluation("b", "cnn", 0.6, chance=0.2, n=300),
        evaluation("c", "old", 0.6),
    ]
    assert results.chance_levels(lines) == {"cnn": pytest.approx(0.275)}


def test_a_run_from_before_chance_and_top_share_shows_na_and_flags_nobody(tmp_path):
    text = summary(tmp_path, [evaluation("a", "cnn", 0.62)], ["cnn"])
    assert "| cnn | 1 | accuracy | 0.6200 | n/a | 1.0000 |" in text
    assert "predicts one class" not in text
    assert "Training examples per class, per client:\n\n(not reported)" in text


def test_label_counts_per_client_from_its_latest_train_line(tmp_path):
    text = summary(
        tmp_path,
        [
            train("a", "cnn", [1, 1, 1]),
            train("a", "cnn", [30, 10, 7], rnd=2),
            train("b", "bert", [5, 45], rnd=2),
        ],
    )
    assert "| client | group | 0 | 1 | 2 |\n|---|---|---:|---:|---:|" in text
    assert "| a | cnn | 30 | 10 | 7 |" in text
    assert "| b | bert | 5 | 45 |  |" in text  # two classes: the third cell is blank
    assert "| a | cnn | 1 | 1 | 1 |" not in text


@pytest.mark.parametrize(("top_share", "flagged"), [(1.0, True), (0.95, True), (0.5, False)])
def test_a_client_predicting_one_class_for_everything_is_flagged(tmp_path, top_share, flagged):
    lines = [
        evaluation("a", "cnn", 0.9, chance=0.1, top_share=0.2),
        evaluation("b", "cnn", 0.1, chance=0.1, top_share=1.0, rnd=1),  # its last one counts
        evaluation("b", "cnn", 0.1, chance=0.1, top_share=top_share),
    ]
    text = summary(tmp_path, lines)
    flag = f"- **b** (cnn) predicts one class for ~everything: {top_share:.2f}"
    assert (flag in text) is flagged
    assert "**a**" not in text


def test_a_missing_group_is_named_with_its_clients_distinct_reasons(tmp_path):
    lines = [
        train("a", "cnn", [1, 1]),
        evaluation("a", "cnn", 0.6),
        dropped("c", "boom", "qa"),
        dropped("c", "boom", "qa", rnd=2),
        dropped("d", "out of memory", "qa"),
        dropped("x", "no identity"),  # the group's own reasons are known: not listed
    ]
    text = summary(tmp_path, lines, ["cnn", "qa"])
    assert "**Missing groups**" in text
    assert "- qa: boom; out of memory\n" in text
    assert "- cnn" not in text and "Dropped replies: 4." in text


def test_a_missing_group_without_named_drops_gets_the_unnamed_reasons(tmp_path):
    lines = [train("a", "cnn", [1, 1]), evaluation("a", "cnn", 0.6), dropped("?", "timeout")]
    text = summary(tmp_path, lines, ["cnn", "qa", "bert"])
    assert "- qa: timeout\n" in text and "- bert: timeout\n" in text


def test_a_run_without_traffic_says_so_instead_of_an_empty_chart(tmp_path):
    assert results.bytes_note({1: (0, 0), 2: (0, 0)}) == results.NO_BYTES
    assert results.bytes_note({}) == results.NO_BYTES
    assert results.bytes_note({1: (0, 0), 2: (10, 4)}) is None
    results.save_figure(results.bytes_figure({1: (0, 0)}, "local"), tmp_path / "bytes.png")
    assert (tmp_path / "bytes.png").stat().st_size > 0


def test_a_single_round_gets_a_single_whole_round_tick():
    fig, ax = plt.subplots()
    ax.plot([1], [0.5], marker="o")
    results.round_axis(ax)
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    assert [t for t in ax.get_xticks() if lo <= t <= hi] == [1.0]
    plt.close(fig)


def test_each_groups_chance_is_a_labelled_dashed_line(tmp_path, monkeypatch):
    drawn = []
    axhline = plt.Axes.axhline
    monkeypatch.setattr(
        plt.Axes,
        "axhline",
        lambda self, y, **kw: (
            drawn.append((y, kw["linestyle"], kw["label"])) or axhline(self, y, **kw)
        ),
    )
    curves = {"cnn": {1: 0.3}, "bert": {1: 0.6}}
    results.save_figure(results.curves_figure(curves, {"cnn": 0.1}, "t"), tmp_path / "accuracy.png")
    assert drawn == [(0.1, "--", "cnn chance")]  # bert reports no chance: no line
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_who_learns_from_whom_per_target_group_and_round():
    target = {"fc": {"transfer_effect": 0.2, "attention": {"cnn": 0.25, "bert": 0.75}}}
    lines = [
        train("a", "cnn", [1, 1]),
        {"round": 2, "stage": "train", "server": {"targets": {"a": target}}},
        {"round": 3, "stage": "train", "server": {"targets": {"a": target}}},
    ]
    stats = results.transfers(lines)
    assert stats == {
        "cnn": {r: {"effect": 0.2, "from cnn": 0.25, "from bert": 0.75} for r in (2, 3)}
    }


def test_plots_show_plain_numbers_and_attention_shares_on_zero_to_one(tmp_path, monkeypatch):
    # every series constant up to float noise in the 7th digit (a share of 1.0 from the mean of
    # two layers' shares), bytes in the hundreds of MB: what matplotlib writes as offsets
    def target(share):
        return {"transfer_effect": 0.2, "attention": {"bert": share}}

    lines = []
    for rnd, noise in ((1, 0.0), (2, 1e-7), (3, 0.0)):
        targets = {"a": {"fc": target(1.0), "conv": target(1.0 - 2 * noise)}}
        lines += [
            train("a", "cnn", [1, 1], rnd, bytes_down=10**8 + rnd, bytes_up=10**8),
            {"round": rnd, "stage": "train", "server": {"targets": targets}},
            evaluation("a", "cnn", 0.5 + noise, rnd=rnd),
        ]
    saved = {}
    save = results.save_figure

    def keep(fig, path):  # what summarize writes, drawn as written
        saved[path.name] = fig
        save(fig, path)

    monkeypatch.setattr(results, "save_figure", keep)
    summary(tmp_path, lines)
    assert sorted(saved) == ["accuracy.png", "bytes.png", "transfer.png"]
    assert results.transfers(lines)["cnn"][2]["from bert"] != 1.0  # the noise is there
    _, shares = saved["transfer.png"].axes
    assert shares.get_ylim() == (0.0, 1.0)
    offsets = {
        (name, i, axis.axis_name): axis.get_offset_text().get_text()
        for name, fig in saved.items()
        for i, ax in enumerate(fig.axes)
        for axis in (ax.xaxis, ax.yaxis)
    }
    assert set(offsets.values()) == {""}, offsets


def test_any_app_gets_jsonl_summary_and_plots_with_one_line(tmp_path):
    from flwr.app import ArrayRecord

    from harness import FakeGrid, TinyClient, set_task_identity
    from mergenet_fl.flower import MergeNet

    set_task_identity()
    grid = FakeGrid(
        [TinyClient(f"m{i}", "mlp", i) for i in range(2)] + [TinyClient("c0", "cnn", 2)]
    )
    run_dir = tmp_path / "my-run"
    seen = []

    def sink(record):  # the one line is `on_round=RunLog(run_dir)`; this one also watches it
        seen.append((record["round"], record["stage"], (run_dir / "summary.md").exists()))
        log(record)

    seen_record = {"round": 0, "stage": "train", "clients": {"m0": {"x": 1}}, "dropped": {}}

    log = results.RunLog(run_dir, title="my run")
    strategy = MergeNet(share="all", min_available_nodes=3, on_round=sink)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=3, timeout=10)
    assert not any(done for *_, done in seen)  # written once the last stage is in, not before
    assert [s[:2] for s in seen][-1] == (3, "evaluate")
    lines = results.read_lines(run_dir)
    assert {x["client"] for x in lines if "client" in x} == {"m0", "m1", "c0"}
    text = (run_dir / "summary.md").read_text()
    assert text.startswith("# my run") and "| mlp | 2 | accuracy |" in text
    assert all((run_dir / f).stat().st_size > 0 for f in ("accuracy.png", "bytes.png"))
    assert (run_dir / "transfer.png").exists()  # MergeNet: who learns from whom
    results.RunLog(run_dir)  # the same folder again: a new run does not append to the old one
    assert not (run_dir / "metrics.jsonl").exists()
    results.RunLog(run_dir / "resumed", append=True)({**seen_record, "round": 4})
    results.RunLog(run_dir / "resumed", append=True)({**seen_record, "round": 5})
    assert [x["round"] for x in results.read_lines(run_dir / "resumed")] == [4, 5]
