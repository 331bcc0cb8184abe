"""What a run leaves for a person: summary.md with chance, label counts and flags; plots."""

import json

from simulations import results


def write(run_dir, lines):
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def evaluation(client, group, accuracy, chance, top_share, rnd=2):
    return {
        "round": rnd,
        "stage": "evaluate",
        "client": client,
        "group": group,
        "num-examples": 100,
        "loss": 1.0,
        "accuracy": accuracy,
        "chance": chance,
        "top_share": top_share,
    }


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


def test_summary_shows_chance_label_counts_and_a_client_stuck_on_one_class(tmp_path):
    write(
        tmp_path,
        [
            train("a", "cnn", [30, 10]),
            train("b", "bert", [5, 45]),
            evaluation("a", "cnn", 0.62, 0.5, 0.5),
            evaluation("b", "bert", 0.52, 0.52, 1.0),
        ],
    )
    text = results.summarize(tmp_path, "t", 1.0, ["cnn", "bert"]).read_text()
    assert "| cnn | 1 | accuracy | 0.6200 | 0.5000 |" in text
    assert "| bert | 1 | accuracy | 0.5200 | 0.5200 |" in text
    assert "| a | cnn | 30 | 10 |" in text and "| b | bert | 5 | 45 |" in text
    assert "**b** (bert) predicts one class for 100 %" in text
    assert "**a**" not in text  # half its predictions in one class: not flagged
    assert "Missing groups" not in text
    assert (tmp_path / "accuracy.png").stat().st_size > 0


def test_a_group_that_never_trained_is_named_with_its_reasons(tmp_path):
    write(
        tmp_path,
        [
            train("a", "cnn", [1, 1]),
            {"round": 1, "stage": "train", "client": "c", "group": "qa", "dropped": "boom"},
            evaluation("a", "cnn", 0.6, 0.5, 0.5),
        ],
    )
    text = results.summarize(tmp_path, "t", 1.0, ["cnn", "qa"]).read_text()
    assert "**Missing groups**" in text and "- qa: boom" in text


def test_a_run_without_traffic_says_so_instead_of_an_empty_chart(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(
        results.plt.Axes, "text", lambda self, *args, **kwargs: drawn.append(args[2])
    )
    results._plot_bytes({1: (0, 0), 2: (0, 0)}, tmp_path / "bytes.png", "local")
    assert drawn == [results.NO_BYTES] and (tmp_path / "bytes.png").exists()


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
