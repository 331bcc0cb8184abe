"""What one client of the federation is: its identity, model, transfer layers, task and data.

Everything follows from the partition id and the composed config (``conf/federation``):
partition ids enumerate the client groups in order, and the clients that share a dataset
split its training set among themselves (IID or Dirichlet over labels, with flwr-datasets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from mergenet_fl import SelectedLayer, as_spec, select_layers
from simulations import data as D
from simulations.config import ExperimentConfig
from simulations.models import build_model
from simulations.tasks import Task, get_task
from strategies import ClientIdentity

log = logging.getLogger(__name__)

IMAGE_DATASETS = ("cifar10", "synthetic-images")
TEXT_DATASETS = ("sst2", "imdb", "agnews", "synthetic-text")
QA_DATASETS = ("squad2",)
TEXT_MAX_LENGTH = 64
QA_MAX_LENGTH = 192


@dataclass
class Workload:
    """One client's model (freshly initialised), transfer layers, task and data."""

    identity: ClientIdentity
    model: nn.Module
    layers: list[SelectedLayer]
    task: Task
    train_set: Dataset
    eval_set: Dataset  # the test split, or validation rows (`eval_split`)


def client_identity(
    cfg: ExperimentConfig, partition_id: int, client_id: str | None = None
) -> ClientIdentity:
    """Who ``partition_id`` is (``client_id`` defaults to ``client-<id>``), without its data."""
    spec, _ = cfg.client(partition_id)
    return ClientIdentity(client_id or f"client-{partition_id}", spec.group, spec.send_only)


def build_workload(
    cfg: ExperimentConfig, partition_id: int, client_id: str | None = None
) -> Workload:
    """The workload of ``partition_id`` (``client_id`` defaults to ``client-<id>``)."""
    spec, index = cfg.client(partition_id)
    seed = cfg.seed * 1000 + partition_id
    train_set, eval_set, num_classes = _datasets(cfg, spec.dataset, index, seed)
    model = build_model(spec.arch, num_classes, seed=seed)
    layers = select_layers(model, as_spec(spec.layers, spec.exclude))
    identity = client_identity(cfg, partition_id, client_id)
    return Workload(identity, model, layers, get_task(spec.task), train_set, eval_set)


def _datasets(
    cfg: ExperimentConfig, name: str, index: int, seed: int
) -> tuple[Dataset, Dataset, int]:
    """Train partition ``index`` of the dataset's clients, an evaluation subset (of the test
    split, or ``cfg.eval_split == "validation"``: of the training rows no client trains on),
    and the number of classes."""
    validation = cfg.eval_split == "validation"
    if name in IMAGE_DATASETS:
        if name == "cifar10":
            x, y = D.load_cifar10("train", cfg.data_dir)
            tx, ty = (x, y) if validation else D.load_cifar10("test", cfg.data_dir)
            num_classes = 10
        else:
            x, y = D.synthetic_images(2000, 4, seed=cfg.seed)
            tx, ty = (x, y) if validation else D.synthetic_images(500, 4, seed=cfg.seed + 1)
            num_classes = 4
        train, held_out = _split(cfg, name, y, index, len(ty), seed)
        return (
            D.ImageDataset(x[train], y[train], train=True),
            D.ImageDataset(tx[held_out], ty[held_out], train=False),
            num_classes,
        )
    if name in TEXT_DATASETS:
        if name == "synthetic-text":
            texts, labels = D.synthetic_texts(2000, 2, seed=cfg.seed)
            test_texts, test_labels = D.synthetic_texts(500, 2, seed=cfg.seed + 1)
            num_classes = 2
        else:
            texts, labels, num_classes = D.load_text_classification(name, "train", cfg.data_dir)
            test_texts, test_labels, _ = D.load_text_classification(name, "test", cfg.data_dir)
        if validation:
            test_texts, test_labels = texts, labels
        tokenizer = D.build_tokenizer(cfg.data_dir)
        train, held_out = _split(cfg, name, np.asarray(labels), index, len(test_labels), seed)
        train_set = D.TextClassificationDataset(
            [texts[i] for i in train], [labels[i] for i in train], tokenizer, TEXT_MAX_LENGTH
        )
        eval_set = D.TextClassificationDataset(
            [test_texts[i] for i in held_out],
            [test_labels[i] for i in held_out],
            tokenizer,
            TEXT_MAX_LENGTH,
        )
        return train_set, eval_set, num_classes
    if name in QA_DATASETS:
        examples = D.load_squad2("train", cfg.data_dir, seed=cfg.seed)
        test = examples if validation else D.load_squad2("test", cfg.data_dir, seed=cfg.seed)
        tokenizer = D.build_tokenizer(cfg.data_dir)
        answerable = np.array([0 if ex.is_impossible else 1 for ex in examples])
        train, held_out = _split(cfg, name, answerable, index, len(test), seed)
        return (
            D.QADataset([examples[i] for i in train], tokenizer, QA_MAX_LENGTH),
            D.QADataset([test[i] for i in held_out], tokenizer, QA_MAX_LENGTH),
            2,
        )
    raise ValueError(
        f"unknown dataset {name!r}; known: {IMAGE_DATASETS + TEXT_DATASETS + QA_DATASETS}"
    )


def _split(
    cfg: ExperimentConfig, dataset: str, labels: np.ndarray, index: int, n_eval: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of client ``index``'s training partition, and its evaluation rows.

    The dataset's training rows are split among the clients that use it (flwr-datasets,
    each client capped at its example count). Evaluation rows are ``cfg.test_examples`` of
    the ``n_eval`` test rows, or for validation of the training rows that no client holds,
    so that settings can be chosen without looking at the test split.
    """
    caps = [peer.examples or cfg.examples_per_client for peer in cfg.peers(dataset)]
    parts = D.partitions(
        labels,
        num_partitions=len(caps),
        scheme=cfg.partition,
        alpha=cfg.alpha,
        seed=cfg.seed,
        max_examples=caps,
    )
    if cfg.eval_split == "validation":
        unused = np.setdiff1d(np.arange(len(labels)), np.concatenate(parts))
        return parts[index], unused[_subset(len(unused), cfg.test_examples, seed)]
    return parts[index], _subset(n_eval, cfg.test_examples, seed)


def _subset(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` of ``n`` rows, drawn without replacement (all of them if ``k >= n``)."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
