"""The robustness study's report: honest clients scored apart from the attackers, each attack
paired with its method's clean run, what the defences cost, and the targets."""

import json

from omegaconf import OmegaConf

from simulations.robustness import attackers, defence_label, write_report

GROUP = {
    "group": "g",
    "task": "image_classification",
    "arch": "cnn4",
    "dataset": "cifar10",
    "layers": ["fc"],
}


def robust_run(root, name, seed, accuracy, *, attack=None, screen=None, server=1.0, share=0.1):
    """Clients 0 and 1 honest (30 and 10 test rows, both at ``accuracy`` in the last round),
    client 2 the attacker slot (armed with ``attack``), always at 0 accuracy; two rounds."""
    run = root / name
    run.mkdir(parents=True)
    strategy = {"name": "mergenet", "share": "none", "screen": screen, "combine": "sum"}
    if screen is not None:
        strategy["combine"] = "median"
    cfg = {
        "seed": seed,
        "transfer_every": 1,
        "rank": 8,
        "strategy": strategy,
        "adapter": {"variant": "lpka"},
        "federation": {
            "clients": [{**GROUP, "count": 2}, {**GROUP, "count": 1, "attack": attack}],
        },
    }
    OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
    lines = []
    for rnd in (1, 2):
        acc = accuracy if rnd == 2 else 0.1
        for client, n, a in (("client-0", 30, acc), ("client-1", 10, acc), ("client-2", 50, 0.0)):
            lines.append(
                {
                    "round": rnd,
                    "stage": "evaluate",
                    "client": client,
                    "group": "g",
                    "num-examples": n,
                    "accuracy": a,
                    "chance": 0.25,
                }
            )
        stats = {"configure_seconds": server / 4, "aggregate_seconds": server / 4}
        stats["piece_shares"] = {"client-0": (1 - share) / 2, "client-1": (1 - share) / 2}
        stats["piece_shares"]["client-2"] = share
        if screen is not None and attack:
            stats["screened_pieces"] = ["client-2"] if rnd == 2 else []
        lines.append({"round": rnd, "stage": "train", "server": stats})
        # the evaluation stage's server line: not a round of training
        lines.append({"round": rnd, "stage": "evaluate", "server": {"aggregate_seconds": 9.0}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "run.json").write_text(json.dumps({"seconds": 30.0}))


def test_attackers_and_defences_are_read_from_the_config():
    clients = [{**GROUP, "count": 4}, {**GROUP, "count": 1, "attack": {"kind": "flip_pieces"}}]
    clients.append({**GROUP, "count": 2, "attack": {"kind": "scale_packet", "factor": 2.0}})
    clients.append({**GROUP, "count": 1, "attack": None})  # a slot, honest in this run
    assert attackers({"clients": clients}) == (
        {"client-4", "client-5", "client-6", "client-7"},
        ("client-4", "client-5", "client-6"),
        "flip_pieces x10 + scale_packet",
    )
    assert attackers({"clients": clients[:1]}) == (set(), (), "none")
    assert defence_label({"screen": None, "combine": "sum", "average": "mean"}) == "none"
    assert defence_label({"screen": 3.0, "combine": "median"}) == "screen 3, combine median"
    assert defence_label({"share": "all", "average": "median"}) == "average median"
    assert defence_label({"share": "none", "average": "median"}) == "none"  # does not apply


def test_report_pairs_each_attack_with_the_clean_run_and_scores_honest_clients_only(tmp_path):
    study = tmp_path / "study"
    flip = {"kind": "flip_pieces", "factor": 10.0}
    for seed in (0, 1):
        bump = 0.01 * seed
        robust_run(study, f"clean{seed}", seed, 0.6 + bump)
        robust_run(study, f"clean-def{seed}", seed, 0.59 + bump, screen=3.0, server=1.05)
        robust_run(study, f"bad{seed}", seed, 0.4 + bump, attack=flip, share=0.8)
        robust_run(study, f"bad-def{seed}", seed, 0.595 + bump, attack=flip, screen=3.0)
    text = write_report(study, tmp_path / "r.md", title="R", command="python -m x").read_text()
    mergenet = "MergeNet (lpka, transfer only)"
    # the attacker slot (0 % on 50 rows) is left out, armed or not: 60 %, not 26.7 %
    assert f"| {mergenet} | none | 60.5 ± 0.7 % (25.0 %) | – | 1.00 | – |" in text
    assert (
        f"| {mergenet} | screen 3, combine median | 59.5 ± 0.7 % (25.0 %) | "
        "-1.0 points [-1.0, -1.0] (95 %, 2 seeds) | 1.05 | x1.05 |" in text
    )
    assert (
        f"| {mergenet} | none | flip_pieces x10 | 1 | 40.5 ± 0.7 % (25.0 %) | "
        "+20.0 points [+20.0, +20.0] (95 %, 2 seeds) | 80 % | – |" in text
    )
    assert "| screen 3, combine median | flip_pieces x10 | 1 | 60.0 ± 0.7 % (25.0 %) |" in text
    assert "+0.5 points [+0.5, +0.5] (95 %, 2 seeds) | 10 % | 50 % |" in text
    targets = text.split("## Attacks")[0]
    assert "cost ≤ 1 point (worst setting) | +0.5 points" in targets
    assert "flip_pieces x10 | yes |" in targets
    assert "two attackers, defences on: cost ≤ 2 points (worst setting) | n/a | **no** |" in targets
    assert (
        f"more server time (largest ratio) | x1.05: {mergenet}, screen 3, combine median | yes |"
        in targets
    )
