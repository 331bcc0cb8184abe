"""Check a whole federation before anything starts: every problem, listed at once.

A broken client would otherwise fail inside the simulation engine in every round while the
run goes on without it. :func:`preflight` builds each architecture on the meta device (no
memory, no time), selects its layers, checks tasks, datasets and their files (sha256), and the
folder a run resumes from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mergenet_fl import as_spec, select_layers
from simulations import data as D
from simulations.config import ConfigError, ExperimentConfig
from simulations.federation import DATASETS, IMAGE_DATASETS, QA_DATASETS, SYNTHETIC_CLASSES
from simulations.models import ARCHITECTURES
from simulations.tasks import TASKS

NUM_CLASSES = {"cifar10": 10, "sst2": 2, "imdb": 2, "agnews": 4, "squad2": 2, **SYNTHETIC_CLASSES}


def task_of_dataset(dataset: str) -> str:
    if dataset in IMAGE_DATASETS:
        return "image_classification"
    return "extractive_qa" if dataset in QA_DATASETS else "text_classification"


def problems(cfg: ExperimentConfig) -> list[str]:
    """Everything that would make a client of ``cfg`` fail, one line each."""
    found: list[str] = []
    heads: dict[str, tuple[int, ...] | None] = {}  # group -> its head's (classes, features)
    for i, group in enumerate(cfg.clients):
        where = f"federation.clients[{i}] ({group.group})"
        known = True
        if group.arch not in ARCHITECTURES:
            found.append(f"{where}: unknown arch {group.arch!r}; known: {sorted(ARCHITECTURES)}")
            known = False
        if group.task not in TASKS:
            found.append(f"{where}: unknown task {group.task!r}; known: {sorted(TASKS)}")
            known = False
        if group.dataset not in DATASETS:
            found.append(f"{where}: unknown dataset {group.dataset!r}; known: {list(DATASETS)}")
            known = False
        if not known:
            continue
        arch_task = ARCHITECTURES[group.arch].task
        if arch_task != group.task or task_of_dataset(group.dataset) != group.task:
            found.append(
                f"{where}: arch {group.arch!r} solves {arch_task}, dataset {group.dataset!r} "
                f"needs {task_of_dataset(group.dataset)}, and the group says {group.task}"
            )
            continue
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = ARCHITECTURES[group.arch].builder(NUM_CLASSES[group.dataset])
        try:
            select_layers(model, as_spec(group.layers, group.exclude))
        except ValueError as exc:
            found.append(f"{where}: layers {list(group.layers)}: {exc}")
        spec = ARCHITECTURES[group.arch]
        classification = group.task != "extractive_qa"
        heads[group.group] = (
            tuple(model.get_submodule(spec.head).weight.shape) if classification else None
        )
    found += _head_problems(cfg, heads)
    for dataset in dict.fromkeys(c.dataset for c in cfg.clients if c.dataset in DATASETS):
        found += D.check_dataset_files(dataset, cfg.data_dir)
    if cfg.strategy.get("name") == "mergenet":
        try:
            cfg.hypernet()
        except (TypeError, ValueError) as exc:
            found.append(f"strategy: {exc}")
    if cfg.resume and not (Path(cfg.resume).expanduser() / "server.ckpt").is_file():
        found.append(
            f"resume={cfg.resume!r}: no checkpoint (server.ckpt) there; resume takes the folder "
            "of a run started with checkpoint=true"
        )
    return found


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
        if arch not in ARCHITECTURES:
            found.append(f"strategy.model: unknown arch {arch!r}; known: {sorted(ARCHITECTURES)}")
        else:
            wrong = sorted({c.group for c in cfg.clients if c.task != ARCHITECTURES[arch].task})
            if wrong:
                found.append(
                    f"strategy {strategy}: the shared model {arch!r} solves "
                    f"{ARCHITECTURES[arch].task}, which groups {wrong} do not; set strategy.model"
                )
    return found


def preflight(cfg: ExperimentConfig) -> None:
    """Raise :class:`~simulations.config.ConfigError` listing every problem of ``cfg``."""
    found = problems(cfg)
    if found:
        raise ConfigError("the federation cannot run:\n  - " + "\n  - ".join(found))
