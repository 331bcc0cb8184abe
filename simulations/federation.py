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
    test_set: Dataset


def client_identity(
    cfg: ExperimentConfig, partition_id: int, client_id: str | None = None
) -> ClientIdentity:
    """Who ``partition_id`` is (``client_id`` defaults to ``client-<id>``), without its data."""
    spec, _, _ = cfg.client(partition_id)
    return ClientIdentity(client_id or f"client-{partition_id}", spec.group, spec.send_only)


def build_workload(
    cfg: ExperimentConfig, partition_id: int, client_id: str | None = None
) -> Workload:
    """The workload of ``partition_id`` (``client_id`` defaults to ``client-<id>``)."""
    spec, index, peers = cfg.client(partition_id)
    seed = cfg.seed * 1000 + partition_id
    examples = spec.examples or cfg.examples_per_client
    train_set, test_set, num_classes = _datasets(cfg, spec.dataset, index, peers, seed, examples)
    model = build_model(spec.arch, num_classes, seed=seed)
    layers = select_layers(model, as_spec(spec.layers, spec.exclude))
    identity = client_identity(cfg, partition_id, client_id)
    return Workload(identity, model, layers, get_task(spec.task), train_set, test_set)


def _datasets(
    cfg: ExperimentConfig, name: str, index: int, peers: int, seed: int, examples: int
) -> tuple[Dataset, Dataset, int]:
    """Train partition ``index`` of ``peers``, a test subset, and the number of classes."""
    if name in IMAGE_DATASETS:
        if name == "cifar10":
            x, y = D.load_cifar10("train", cfg.data_dir)
            tx, ty = D.load_cifar10("test", cfg.data_dir)
            num_classes = 10
        else:
            x, y = D.synthetic_images(2000, 4, seed=cfg.seed)
            tx, ty = D.synthetic_images(500, 4, seed=cfg.seed + 1)
            num_classes = 4
        rows = _partition(cfg, y, index, peers, examples)
        test = _subset(len(ty), cfg.test_examples, seed)
        return (
            D.ImageDataset(x[rows], y[rows], train=True),
            D.ImageDataset(tx[test], ty[test], train=False),
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
        tokenizer = D.build_tokenizer(cfg.data_dir)
        rows = _partition(cfg, np.asarray(labels), index, peers, examples)
        test = _subset(len(test_labels), cfg.test_examples, seed)
        train_set = D.TextClassificationDataset(
            [texts[i] for i in rows], [labels[i] for i in rows], tokenizer, TEXT_MAX_LENGTH
        )
        test_set = D.TextClassificationDataset(
            [test_texts[i] for i in test],
            [test_labels[i] for i in test],
            tokenizer,
            TEXT_MAX_LENGTH,
        )
        return train_set, test_set, num_classes
    if name in QA_DATASETS:
        train = D.load_squad2("train", cfg.data_dir, seed=cfg.seed)
        test = D.load_squad2("test", cfg.data_dir, seed=cfg.seed)
        tokenizer = D.build_tokenizer(cfg.data_dir)
        answerable = np.array([0 if ex.is_impossible else 1 for ex in train])
        rows = _partition(cfg, answerable, index, peers, examples)
        keep = _subset(len(test), cfg.test_examples, seed)
        return (
            D.QADataset([train[i] for i in rows], tokenizer, QA_MAX_LENGTH),
            D.QADataset([test[i] for i in keep], tokenizer, QA_MAX_LENGTH),
            2,
        )
    raise ValueError(
        f"unknown dataset {name!r}; known: {IMAGE_DATASETS + TEXT_DATASETS + QA_DATASETS}"
    )


def _partition(
    cfg: ExperimentConfig, labels: np.ndarray, index: int, peers: int, examples: int
) -> np.ndarray:
    return D.partition_indices(
        labels,
        num_partitions=peers,
        partition_id=index,
        scheme=cfg.partition,
        alpha=cfg.alpha,
        seed=cfg.seed,
        max_examples=examples,
    )


def _subset(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` of ``n`` rows, drawn without replacement (all of them if ``k >= n``)."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
