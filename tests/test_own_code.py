"""Bring your own model and data: a client group's ``arch`` and ``dataset`` as ``_target_``s
(tests/own_code.py, federation tests/conf/federation/own_code.yaml), checked before the run and
run end to end on Flower's simulation engine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from harness import needs_real_data
from simulations.config import ConfigError, compose
from simulations.federation import build_workload
from simulations.preflight import problems
from simulations.report import fedavg_bytes

ROOT = Path(__file__).resolve().parent.parent
OWN = [f"hydra.searchpath=[file://{ROOT / 'tests' / 'conf'}]", "federation=own_code"]
IMAGES = "federation.clients.0"


def test_groups_name_their_targets_and_the_federation_passes_preflight():
    cfg = compose(OWN)
    images, text = cfg.clients
    assert images.arch == "tests.own_code.make_net(width=8)" and images.head == "head"
    assert images.model == {"_target_": "tests.own_code.make_net", "width": 8}
    assert images.dataset == "tests.own_code.colours()" and images.columns["image"] == "img"
    assert text.arch == "fasttext" and text.model is None
    assert cfg.peers(images.dataset) == [images, images]  # they share that dataset's rows
    assert problems(cfg) == []


def test_every_problem_of_the_targets_is_listed_at_once():
    cfg = compose(
        [
            *OWN,
            f"{IMAGES}.arch._target_=tests.own_code.no_such_net",
            f"{IMAGES}.columns.label=target",
            "federation.clients.1.dataset._target_=torch.nn.Identity",
        ]
    )
    found = problems(cfg)
    assert len(found) == 2, found
    assert "smallnet-colours" in found[0] and "lack the columns ['target']" in found[0]
    assert "fasttext-phrases" in found[1] and "torch.nn.Identity returned Identity" in found[1]
    cfg = compose([*OWN, f"{IMAGES}.arch._target_=tests.own_code.no_such_net"])
    (problem,) = problems(cfg)
    assert "arch cannot be built: tests.own_code.no_such_net: " in problem


def test_a_head_that_is_not_the_classes_linear_is_refused():
    (problem,) = problems(compose([*OWN, f"{IMAGES}.head=body.0"]))
    assert "head 'body.0' must be an nn.Linear with 3 outputs" in problem
    (problem,) = problems(compose([*OWN, f"{IMAGES}.layers=[tail]"]))
    assert "layers ['tail']" in problem


def test_a_target_model_must_name_its_head_and_columns_need_a_target_dataset():
    with pytest.raises(ConfigError) as err:
        compose([*OWN, f"~{IMAGES}.head", "federation.clients.1.dataset=sst2"])
    assert "clients[0].head must name the _target_ model's output nn.Linear" in str(err.value)
    with pytest.raises(ConfigError, match=r"clients\[1\].columns applies to a _target_ data"):
        compose([*OWN, "federation.clients.1.dataset=sst2", "+federation.clients.1.columns.text=t"])
    with pytest.raises(ConfigError, match=r"clients\[1\].head applies to a _target_ arch"):
        compose([*OWN, "+federation.clients.1.head=fc"])
    with pytest.raises(ConfigError, match=r"clients\[0\].columns maps"):
        compose([*OWN, f"+{IMAGES}.columns.pixels=img"])


@needs_real_data  # the text group's tokenizer
def test_clients_of_a_target_dataset_hold_disjoint_partitions_of_its_rows():
    cfg = compose(OWN)
    first, second = build_workload(cfg, 0), build_workload(cfg, 1)
    assert type(first.model).__name__ == "SmallNet" and first.head == "head"
    assert [layer.name for layer in first.layers] == ["head"]
    assert len(first.data.train_rows) == len(second.data.train_rows) == 192  # 480 · 0.8 / 2
    assert not set(first.data.train_rows) & set(second.data.train_rows)
    assert first.data.num_classes == 3 and sum(first.data.label_counts) == 192
    image, label = first.train_set[0]
    assert tuple(image.shape) == (3, 16, 16) and 0 <= int(label) < 3
    text = build_workload(cfg, 2)
    assert text.data.num_classes == 4 and len(text.data.train_rows) == 200  # capped
    assert len(text.eval_set) == 100


def test_images_as_arrays_and_as_one_split_load_alike():
    from simulations import custom

    # the default column names are not that dataset's; named ones are
    with pytest.raises(custom.TargetError, match=r"lack the columns \['image', 'label'\]"):
        custom._load({"_target_": "tests.own_code.colours"}, "image_classification", custom.COLUMNS)
    named = {"image": "img", "label": "y"}
    as_pil = custom.load_data({"_target_": "tests.own_code.colours"}, "image_classification", named)
    as_lists = custom.load_data(
        {"_target_": "tests.own_code.colours", "pil": False}, "image_classification", named
    )
    assert as_pil.train_inputs.shape == (384, 16, 16, 3) and as_pil.num_classes == 3
    assert np.array_equal(as_pil.train_inputs, as_lists.train_inputs)
    assert np.array_equal(as_pil.test_labels, as_lists.test_labels)


@needs_real_data
@pytest.mark.slow
def test_own_model_and_data_run_end_to_end(tmp_path):
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "simulations.run", *OWN, "num_rounds=3"]
    cmd.append(f"output_dir={tmp_path}")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = list(tmp_path.iterdir())
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [x for x in lines if x.get("stage") == "evaluate" and x.get("round") == 3]
    scores = {x["group"]: x["accuracy"] for x in final if "client" in x}
    assert set(scores) == {"smallnet-colours", "fasttext-phrases"}
    assert scores["smallnet-colours"] > 0.6 and scores["fasttext-phrases"] > 0.6  # chance ≤ 0.4
    server = [x["server"] for x in lines if "server" in x and x["stage"] == "train"]
    assert server[-1]["transfer"] is True and server[-1]["pieces"] == 3.0
    run_config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    assert fedavg_bytes(run_config) > 0  # the study report sizes the user's models too
