"""The study report is computed from run folders; here from hand-made ones with known numbers."""

import json

from omegaconf import OmegaConf

from simulations.report import collect, write_report


def fake_run(root, name, strategy, seed, scores, share="unselected"):
    run = root / name
    run.mkdir(parents=True)
    cfg = {
        "seed": seed,
        "transfer_every": 1,
        "strategy": {"name": strategy, "share": share},
        "adapter": {"variant": "lpka"},
        "federation": {
            "clients": [{"arch": "resnet8", "dataset": "cifar10", "count": 2}],
        },
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
                }
            )
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "run.json").write_text(json.dumps({"seconds": 12.0}))


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

    dest = tmp_path / "docs" / "results.md"
    write_report(study, dest, title="T", command="cmd")
    text = dest.read_text()
    assert "| LocalOnly | 2 | 21.0 ± 1.4 |" in text
    assert "| MergeNet (lpka) | 2 | 28.0 ± 2.8 |" in text
    assert "- MergeNet (lpka): r8 +7.0 ± 2.8" in text
    assert "2.0 %" in text  # client overhead
    assert (tmp_path / "docs" / "figures" / "results-0.png").stat().st_size > 0
