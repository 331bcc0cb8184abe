"""Check a whole federation before anything starts: every problem, listed at once.

A broken client would otherwise fail inside the simulation engine in every round while the
run goes on without it. :func:`preflight` builds each architecture on the meta device (no
memory, no time), selects its layers, checks tasks, datasets and their files (sha256), and the
folder a run resumes from. A ``_target_`` model must import and build with its head, and a
``_target_`` dataset is loaded to check its columns and count its classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mergenet_fl import AdapterConfig, as_spec, select_layers
from mergenet_fl.robust import combine
from simulations import custom
from simulations import data as D
from simulations.config import ClientGroup, ConfigError, ExperimentConfig
from simulations.federation import DATASETS, IMAGE_DATASETS, QA_DATASETS, SYNTHETIC_CLASSES
from simulations.models import ARCHITECTURES
from simulations.tasks import TASKS

NUM_CLASSES = {"cifar10": 10, "sst2": 2, "imdb": 2, "agnews": 4, "squad2": 2, **SYNTHETIC_CLASSES}


def task_of_dataset(dataset: str) -> str:
    if dataset in IMAGE_DATASETS:
        return "image_classification"
    return "extractive_qa" if dataset in QA_DATASETS else "text_classification"


def num_classes(group: ClientGroup) -> int:
    """The class count of ``group``'s dataset (a ``_target_`` dataset is loaded for it)."""
    if group.data is None:
        return NUM_CLASSES[group.dataset]
    return custom.load_data(group.data, group.task, group.columns).num_classes


def problems(cfg: ExperimentConfig) -> list[str]:
    """Everything that would make a client of ``cfg`` fail, one line each."""
    found: list[str] = []
    heads: dict[str, tuple[int, ...] | None] = {}  # group -> its head's (classes, features)
    for i, group in enumerate(cfg.clients):
        where = f"federation.clients[{i}] ({group.group})"
        group_problems = _group_problems(cfg, group, heads)
        found += [f"{where}: {problem}" for problem in group_problems]
    found += _head_problems(cfg, heads)
    for dataset in dict.fromkeys(c.dataset for c in cfg.clients if c.dataset in DATASETS):
        found += D.check_dataset_files(dataset, cfg.data_dir)
    if cfg.strategy.get("name") == "mergenet":
        try:
            cfg.hypernet()
        except (TypeError, ValueError) as exc:
            found.append(f"strategy: {exc}")
    found += _defence_problems(cfg.strategy)
    if cfg.resume and not (Path(cfg.resume).expanduser() / "server.ckpt").is_file():
        found.append(
            f"resume={cfg.resume!r}: no checkpoint (server.ckpt) there; resume takes the folder "
            "of a run started with checkpoint=true"
        )
    return found


def _defence_problems(strategy: dict) -> list[str]:
    """A robust group average or a screening factor that the strategy would refuse."""
    found = []
    try:
        combine(
            [np.zeros(1)], [1.0], strategy.get("average", "mean"), float(strategy.get("trim", 0.2))
        )
    except (TypeError, ValueError) as exc:
        found.append(f"strategy.average / strategy.trim: {exc}")
    screen = strategy.get("screen")
    if screen is not None and (
        isinstance(screen, bool) or not isinstance(screen, (int, float)) or screen < 1
    ):
        found.append(f"strategy.screen must be a number >= 1 or null, got {screen!r}")
    return found


def _group_problems(
    cfg: ExperimentConfig, group: ClientGroup, heads: dict[str, tuple[int, ...] | None]
) -> list[str]:
    """What is wrong with one client group; its head's weight shape goes to ``heads``."""
    found = []
    if group.model is None and group.arch not in ARCHITECTURES:
        found.append(f"unknown arch {group.arch!r}; known: {sorted(ARCHITECTURES)}")
    if group.task not in TASKS:
        found.append(f"unknown task {group.task!r}; known: {sorted(TASKS)}")
    if group.data is None and group.dataset not in DATASETS:
        found.append(f"unknown dataset {group.dataset!r}; known: {list(DATASETS)}")
    if found:
        return found
    try:
        classes = num_classes(group)
    except Exception as exc:  # a _target_ dataset: anything the user's callable raises
        return [f"dataset: {exc}"]
    data_task = task_of_dataset(group.dataset) if group.data is None else group.task
    if group.data is not None and group.task == "text_classification":
        found += D.check_files(D.tokenizer_files(cfg.data_dir))
    spec = group.arch_spec
    if spec.task != group.task or data_task != group.task:
        return [
            f"arch {group.arch!r} solves {spec.task}, dataset {group.dataset!r} needs "
            f"{data_task}, and the group says {group.task}"
        ]
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = spec.builder(classes)
    except Exception as exc:  # a _target_ model: anything it raises is the problem
        return [*found, f"arch cannot be built: {exc}"]
    try:
        selected = select_layers(model, as_spec(group.layers, group.exclude))
    except ValueError as exc:
        found.append(f"layers {list(group.layers)}: {exc}")
    else:
        found += _whole_weight_problems(cfg, selected)
    if group.task == "extractive_qa":
        heads[group.group] = None
        return found
    head = dict(model.named_modules()).get(spec.head)
    if not isinstance(head, nn.Linear) or head.out_features != classes:
        found.append(
            f"head {spec.head!r} must be an nn.Linear with {classes} outputs (the "
            f"dataset's classes), got {head!r}"
        )
    else:
        heads[group.group] = tuple(head.weight.shape)
    return found


def _whole_weight_problems(cfg: ExperimentConfig, selected: list) -> list[str]:
    """Layers too large to travel whole under the reference adapter (``adapter.max_rows``)."""
    if cfg.strategy.get("name") != "mergenet" or cfg.adapter.get("variant") != "reference":
        return []
    limit = cfg.adapter.get("max_rows", AdapterConfig.max_rows)
    return [
        f"layer {layer.name!r} ({layer.matrix_shape[0]}x{layer.matrix_shape[1]}) has more than "
        f"adapter.max_rows={limit} rows to travel whole under adapter=reference"
        for layer in selected
        if layer.matrix_shape[0] > limit
    ]


# what each method exchanges, and what of the head's weight shape (classes, features) it needs
HEAD_SHAPE, CLASS_COUNT = "head shape (classes, features)", "class count"
SHARES = {
    "lgfedavg": ("the head", HEAD_SHAPE),
    "fedproto": ("per-class mean features", HEAD_SHAPE),
    "fedtgp": ("per-class mean features", HEAD_SHAPE),
    "fedgh": ("per-class mean features and a global head", HEAD_SHAPE),
    "fd": ("per-class mean logits", CLASS_COUNT),
    "fml": ("a shared model", CLASS_COUNT),
    "fedkd": ("a shared mentee", CLASS_COUNT),
}


def _head_problems(cfg: ExperimentConfig, heads: dict[str, tuple[int, ...] | None]) -> list[str]:
    """LG-FedAvg averages the head and FedProto the head's input per class: both need one head
    shape ``(classes, features)`` across the federation; FD averages logits per class, FML and
    FedKD a shared model: one class count (and for those two, a shared architecture of the
    clients' task). All need a classification head."""
    strategy = str(cfg.strategy.get("name"))
    if strategy not in SHARES:
        return []
    what, need = SHARES[strategy]
    found = [
        f"strategy {strategy}: group {g!r} is extractive QA, which has no class head"
        for g, shape in heads.items()
        if shape is None
    ]
    shapes = {g: shape for g, shape in heads.items() if shape is not None}
    if len({shape if need == HEAD_SHAPE else shape[0] for shape in shapes.values()}) > 1:
        listed = ", ".join(f"{g} {shape}" for g, shape in shapes.items())
        found.append(
            f"strategy {strategy} shares {what}, so every client needs the same {need}, and "
            f"this federation's heads are {listed}; use one whose models share it "
            "(federation=htfe2)"
        )
    if strategy in ("fml", "fedkd"):
        arch = cfg.shared_arch
        if arch is None:
            found.append(
                f"strategy.model: unknown arch {cfg.strategy.get('model')!r}; known: "
                f"{sorted(ARCHITECTURES)}"
            )
        else:
            wrong = sorted({c.group for c in cfg.clients if c.task != arch.task})
            if wrong:
                found.append(
                    f"strategy {strategy}: the shared model {arch.name!r} solves "
                    f"{arch.task}, which groups {wrong} do not; set strategy.model"
                )
    return found


def preflight(cfg: ExperimentConfig) -> None:
    """Raise :class:`~simulations.config.ConfigError` listing every problem of ``cfg``."""
    found = problems(cfg)
    if found:
        raise ConfigError("the federation cannot run:\n  - " + "\n  - ".join(found))
