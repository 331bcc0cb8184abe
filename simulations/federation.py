"""What one client of the federation is: its identity, model, transfer layers, task and data.

Everything follows from the partition id and the composed config (``conf/federation``):
partition ids enumerate the client groups in order, and the clients that share a dataset
split its training set among themselves (IID or Dirichlet over labels, with flwr-datasets).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from mergenet_fl import SelectedLayer, as_spec, select_layers
from mergenet_fl.flower import ClientIdentity
from simulations import cache, custom
from simulations import data as D
from simulations.cache import KeyedCache
from simulations.config import ClientGroup, ExperimentConfig
from simulations.models import build_model
from simulations.tasks import Task, TrainState, get_task, resolve_device

log = logging.getLogger(__name__)

IMAGE_DATASETS = ("cifar10", "synthetic-images")
TEXT_DATASETS = ("sst2", "imdb", "agnews", "synthetic-text")
QA_DATASETS = ("squad2",)
DATASETS = IMAGE_DATASETS + TEXT_DATASETS + QA_DATASETS
SYNTHETIC_CLASSES = {"synthetic-images": 4, "synthetic-text": 2}
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 2000, 500  # rows of one distribution, cut in two
TEXT_MAX_LENGTH = 64
QA_MAX_LENGTH = 192


DATA_VERSION = 5  # bump when the way client data is built changes


@dataclass(frozen=True)
class ClientData:
    """One client's datasets: ``train_rows`` and ``eval_rows`` index the dataset's splits
    (``federation.split=standard``: ``train_rows`` its train split, ``eval_rows`` its test
    split, or its train split with ``eval_split=validation``), or with ``split=pooled`` the
    pooled rows: the train split's, then the test split's."""

    train_set: Dataset
    eval_set: Dataset  # the test split, or validation rows (`eval_split`)
    num_classes: int
    train_rows: np.ndarray
    eval_rows: np.ndarray
    label_counts: tuple[int, ...]  # training examples per class (QA: unanswerable, answerable)
    global_set: Dataset | None = None  # with eval_split=local: uniform test rows as well
    validation_set: Dataset | None = None  # split=pooled: the client's own validation rows
    validation_set: Dataset | None = None  # split=pooled, validation_fraction > 0: its own


@dataclass
class Workload:
    """One client's model, transfer layers, task and data, built once per process.

    ``model`` is reused by every message of the client in this process: restore the client's
    own weights (``context.state``) or :meth:`reset_model` before using it.
    """

    identity: ClientIdentity
    model: nn.Module
    layers: list[SelectedLayer]
    task: Task
    data: ClientData
    initial_state: dict[str, torch.Tensor]
    head: str  # module name of the model's output layer (its input: the features)
    lr: float | None = None  # the architecture's learning rate (None: the task's default)
    train_state: TrainState = field(default_factory=TrainState)
    synced: str | None = None  # token of the context.state that model and train_state hold

    @property
    def train_set(self) -> Dataset:
        return self.data.train_set

    @property
    def eval_set(self) -> Dataset:
        return self.data.eval_set

    def reset_model(self) -> None:
        """Back to the freshly initialised weights."""
        self.model.load_state_dict(self.initial_state)
        self.synced = None


_DATA: KeyedCache[ClientData] = KeyedCache("client-data", D.default_cache_dir)
_WORKLOADS: KeyedCache[Workload] = KeyedCache("workloads")  # memory only: holds a model
_PRETRAINED: KeyedCache[dict] = KeyedCache("pretrained", D.default_cache_dir)


def client_identity(
    cfg: ExperimentConfig, partition_id: int, client_id: str | None = None
) -> ClientIdentity:
    """Who ``partition_id`` is (``client_id`` defaults to ``client-<id>``), without its data."""
    spec, _ = cfg.client(partition_id)
    return ClientIdentity(client_id or f"client-{partition_id}", spec.group, spec.send_only)


def build_workload(
    cfg: ExperimentConfig, partition_id: int, client_id: str | None = None
) -> Workload:
    """The workload of ``partition_id`` (``client_id`` defaults to ``client-<id>``), from the
    process's cache when an earlier message built it."""
    spec, index = cfg.client(partition_id)
    # One initialisation per group, as FedAvg starts from one model: members that average
    # their weights must not start apart.
    seed = cfg.seed * 1000 + cfg.clients.index(spec)
    data_parts = _data_parts(cfg, spec, index)
    parts = {
        "data": data_parts,
        "arch": spec.model or spec.arch,
        "head": spec.head,
        "task": spec.task,
        "layers": spec.layers,
        "exclude": spec.exclude,
        "seed": seed,
        "identity": str(client_identity(cfg, partition_id, client_id)),
        "optimizer": cfg.client_optimizer,
        "pretrain": [spec.pretrain_epochs, cfg.batch_size, cfg.augment, cfg.numerics().precision],
    }

    def build() -> Workload:
        # a `_target_` dataset may return other rows for the same config: memory only
        on_disk = spec.data is None
        data = _DATA.get(data_parts, lambda: _client_data(cfg, spec, index), disk=on_disk)
        arch = spec.arch_spec
        model = build_model(arch, data.num_classes, seed=seed)
        layers = select_layers(model, as_spec(spec.layers, spec.exclude))
        identity = client_identity(cfg, partition_id, client_id)
        task = get_task(spec.task, cfg.train_config(spec.task))
        lr = cfg.client_optimizer.get("lr") or arch.lr  # a configured lr is every client's
        if spec.pretrain_epochs:
            trained = _PRETRAINED.get(
                {**parts, "identity": None},  # the same whatever id the client has
                lambda: _pretrain(cfg, spec, model, task, data, lr),
                disk=on_disk,
            )
            model.load_state_dict(trained)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        return Workload(identity, model, layers, task, data, initial, arch.head, lr)

    return _WORKLOADS.get(parts, build)


def _pretrain(
    cfg: ExperimentConfig,
    spec: ClientGroup,
    model: nn.Module,
    task: Task,
    data: ClientData,
    lr: float | None,
) -> dict[str, torch.Tensor]:
    """``model`` trained ``spec.pretrain_epochs`` epochs on its own rows (its state)."""
    log.info("%s: pre-training %d epochs on its rows", spec.group, spec.pretrain_epochs)
    metrics = task.train(
        model,
        data.train_set,
        epochs=spec.pretrain_epochs,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        lr=lr,
        device=resolve_device(cfg.device),
        numerics=cfg.numerics(),
    )
    log.info("%s: pre-trained, loss %.3f", spec.group, metrics["train_loss"])
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _data_parts(cfg: ExperimentConfig, spec: ClientGroup, index: int) -> dict[str, object]:
    """Everything client ``index`` of ``spec``'s dataset has its data built from."""
    dataset = spec.dataset
    return {
        "version": DATA_VERSION,
        "dataset": dataset,
        "target": [spec.data, spec.columns, spec.task],
        "index": index,
        "seed": cfg.seed,
        "partition": cfg.partition,
        "alpha": cfg.alpha,
        "caps": [peer.examples or cfg.examples_per_client for peer in cfg.peers(dataset)],
        "schemes": [peer.partition for peer in cfg.peers(dataset)],
        "eval_split": cfg.eval_split,
        "test_examples": cfg.test_examples,
        "split": [cfg.split, cfg.test_fraction, cfg.validation_fraction, cfg.min_partition_size],
        "augment": cfg.augment,
        "files": {
            f"{path.parent.name}/{path.name}": cache.file_digest(path)
            for path in D.dataset_files(dataset, cfg.data_dir)
            if path.is_file()  # a missing file fails in the loader, naming it
        },
    }


def _client_data(cfg: ExperimentConfig, spec: ClientGroup, index: int) -> ClientData:
    """Train partition ``index`` of the dataset's clients and an evaluation subset (of the test
    split; ``local``: with the label distribution of the client's partition; ``validation``:
    of the training rows no client trains on)."""
    name = spec.dataset
    pooled = cfg.split == "pooled"
    validation = cfg.eval_split == "validation" and not pooled
    seed = cfg.seed * 1000 + index
    if spec.task == "image_classification":
        x, y, tx, ty, num_classes = _images(cfg, spec)
        if validation:
            tx, ty = x, y
        if pooled:  # HtFLlib: one pool of rows for every client's train and test
            x = tx = np.concatenate([x, tx])
            y = ty = np.concatenate([np.asarray(y), np.asarray(ty)])
        train, held_out, uniform, own = _split(cfg, name, y, index, np.asarray(ty), seed)

        def images(rows: np.ndarray | None) -> Dataset | None:
            return None if rows is None else D.ImageDataset(tx[rows], ty[rows], train=False)

        return ClientData(
            D.ImageDataset(x[train], y[train], train=cfg.augment),
            images(held_out),
            num_classes,
            train,
            held_out,
            _counts(y[train], num_classes),
            images(uniform),
            images(own),
        )
    if spec.task == "text_classification":
        texts, labels, test_texts, test_labels, num_classes = _texts(cfg, spec)
        if validation:
            test_texts, test_labels = texts, labels
        if pooled:  # HtFLlib: one pool of rows for every client's train and test
            texts = test_texts = list(texts) + list(test_texts)
            labels = test_labels = list(labels) + list(test_labels)
        tokenizer = D.build_tokenizer(cfg.data_dir)
        y = np.asarray(labels)
        train, held_out, uniform, own = _split(cfg, name, y, index, np.asarray(test_labels), seed)

        def sentences(rows: np.ndarray | None) -> Dataset | None:
            if rows is None:
                return None
            return D.TextClassificationDataset(
                [test_texts[i] for i in rows],
                [test_labels[i] for i in rows],
                tokenizer,
                TEXT_MAX_LENGTH,
            )

        return ClientData(
            D.TextClassificationDataset(
                [texts[i] for i in train], [labels[i] for i in train], tokenizer, TEXT_MAX_LENGTH
            ),
            sentences(held_out),
            num_classes,
            train,
            held_out,
            _counts(y[train], num_classes),
            sentences(uniform),
            sentences(own),
        )
    if spec.task == "extractive_qa":
        if pooled:
            raise ValueError(
                f"federation.split=pooled splits classification rows by label; {name!r} is "
                "extractive QA: use split=standard"
            )
        examples = D.load_squad2("train", cfg.data_dir, seed=cfg.seed)
        test = examples if validation else D.load_squad2("test", cfg.data_dir, seed=cfg.seed)
        tokenizer = D.build_tokenizer(cfg.data_dir)
        answerable = np.array([0 if ex.is_impossible else 1 for ex in examples])
        test_answerable = np.array([0 if ex.is_impossible else 1 for ex in test])
        train, held_out, uniform, _ = _split(cfg, name, answerable, index, test_answerable, seed)

        def questions(rows: np.ndarray) -> Dataset:
            return D.QADataset([test[i] for i in rows], tokenizer, QA_MAX_LENGTH)

        return ClientData(
            D.QADataset([examples[i] for i in train], tokenizer, QA_MAX_LENGTH),
            questions(held_out),
            2,
            train,
            held_out,
            _counts(answerable[train], 2),
            None if uniform is None else questions(uniform),
        )
    raise ValueError(f"group {spec.group!r}: unknown task {spec.task!r}")


def _images(
    cfg: ExperimentConfig, spec: ClientGroup
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """An image dataset's train images ``[N, H, W, 3]`` uint8 and labels ``[N]``, its test
    images and labels, and its class count."""
    if spec.data is not None:
        data = custom.load_data(spec.data, spec.task, spec.columns)
        return (*_rows(data), data.num_classes)
    if spec.dataset == "cifar10":
        x, y = D.load_cifar10("train", cfg.data_dir)
        return x, y, *D.load_cifar10("test", cfg.data_dir), 10
    num_classes = SYNTHETIC_CLASSES[spec.dataset]  # one distribution, cut in two
    images, labels = D.synthetic_images(SYNTHETIC_TRAIN + SYNTHETIC_TEST, num_classes, 0)
    cut = SYNTHETIC_TRAIN
    return images[:cut], labels[:cut], images[cut:], labels[cut:], num_classes


def _texts(cfg: ExperimentConfig, spec: ClientGroup) -> tuple[list, list, list, list, int]:
    """A text dataset's train texts and labels, its test texts and labels, its class count."""
    if spec.data is not None:
        data = custom.load_data(spec.data, spec.task, spec.columns)
        train, labels, test, test_labels = _rows(data)
        return train, labels.tolist(), test, test_labels.tolist(), data.num_classes
    if spec.dataset == "synthetic-text":
        num_classes = SYNTHETIC_CLASSES[spec.dataset]
        texts, labels = D.synthetic_texts(SYNTHETIC_TRAIN + SYNTHETIC_TEST, num_classes, seed=0)
        cut = SYNTHETIC_TRAIN
        return texts[:cut], labels[:cut], texts[cut:], labels[cut:], num_classes
    texts, labels, num_classes = D.load_text_classification(spec.dataset, "train", cfg.data_dir)
    test_texts, test_labels, _ = D.load_text_classification(spec.dataset, "test", cfg.data_dir)
    return texts, labels, test_texts, test_labels, num_classes


def _rows(data: custom.CustomData) -> tuple[Any, np.ndarray, Any, np.ndarray]:
    return data.train_inputs, data.train_labels, data.test_inputs, data.test_labels


def _counts(labels: np.ndarray, num_classes: int) -> tuple[int, ...]:
    return tuple(int(c) for c in np.bincount(labels, minlength=num_classes))


def _split(
    cfg: ExperimentConfig,
    dataset: str,
    labels: np.ndarray,
    index: int,
    eval_labels: np.ndarray,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Rows of client ``index``'s training partition, its evaluation rows, with ``local``
    also uniformly drawn test rows (the global test the report shows beside the local one),
    and under ``split=pooled`` its own validation rows (None: none).

    ``standard``: the dataset's training rows are split among the clients that use it
    (flwr-datasets, each client capped at its example count). Evaluation rows are
    ``cfg.test_examples`` of the test rows (``eval_labels`` are their labels): uniformly drawn
    (``test``), or with the label distribution of the client's partition (``local``, how
    personalised FL scores a client); or for ``validation`` of the training rows that no
    client holds, so that settings can be chosen without looking at the test split.

    ``pooled`` (HtFLlib): ``labels`` are the train and test rows pooled; each client's share
    (capped at its example count, at least ``min_partition_size`` rows) is cut at random into
    its test (``test_fraction``), validation (``validation_fraction``) and training rows, and
    it is evaluated on its own test rows (``eval_split=validation``: its validation rows).
    """
    parts = _partitions(cfg, dataset, labels)
    if cfg.split == "pooled":
        share = np.random.default_rng(seed).permutation(parts[index])
        tests = round(len(share) * cfg.test_fraction)
        held = round(len(share) * cfg.validation_fraction)
        test, own = np.sort(share[:tests]), np.sort(share[tests : tests + held])
        train = np.sort(share[tests + held :])
        if cfg.eval_split == "validation":
            return train, own, None, None
        return train, test, None, own if held else None
    if cfg.eval_split == "validation":
        unused = np.setdiff1d(np.arange(len(labels)), np.concatenate(parts))
        if not len(unused):
            raise ValueError(
                f"eval_split=validation takes the training rows of {dataset!r} that no client "
                "holds, and its clients hold them all: lower federation.examples_per_client"
            )
        return parts[index], unused[_subset(len(unused), cfg.test_examples, seed)], None, None
    uniform = _subset(len(eval_labels), cfg.test_examples, seed)
    if cfg.eval_split == "local":
        local = local_rows(eval_labels, labels[parts[index]], cfg.test_examples, seed)
        return parts[index], local, uniform, None
    return parts[index], uniform, None, None


def _partitions(cfg: ExperimentConfig, dataset: str, labels: np.ndarray) -> list[np.ndarray]:
    """Every client of ``dataset``'s rows (indices into ``labels: (N,)``), in partition order.

    Clients of a group with ``partition: iid`` (e.g. a data-rich hub among label-skewed
    clients) first draw their rows uniformly, each its example count; the federation's
    partition (flwr-datasets) then splits the other rows among the other clients. In an IID
    federation only a client that asks for more rows than an even shard holds draws first
    (the shard would silently cut it short); the others share even shards as before.
    """
    peers = cfg.peers(dataset)
    caps = [peer.examples or cfg.examples_per_client for peer in peers]
    shard = len(labels) // len(peers)
    drawn = [
        i
        for i, peer in enumerate(peers)
        if peer.partition == "iid" and (cfg.partition != "iid" or caps[i] > shard)
    ]
    rest = np.arange(len(labels))
    parts: list[np.ndarray | None] = [None] * len(peers)
    if drawn:
        order = np.random.default_rng((cfg.seed, len(labels))).permutation(len(labels))
        start = 0
        for i in drawn:
            parts[i] = np.sort(order[start : start + caps[i]])
            start += caps[i]
        rest = np.sort(order[start:])
    others = [i for i in range(len(peers)) if i not in drawn]
    split = D.partitions(
        labels[rest],
        num_partitions=len(others),
        scheme=cfg.partition,
        alpha=cfg.alpha,
        seed=cfg.seed,
        max_examples=[caps[i] for i in others],
        min_partition_size=cfg.min_partition_size,
    )
    for i, rows in zip(others, split, strict=True):
        parts[i] = rest[rows]
    return parts


def local_rows(eval_labels: np.ndarray, train_labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """About ``k`` rows of ``eval_labels: (N,)`` whose label shares follow ``train_labels``'
    (largest remainder; a class with fewer rows gives all it has), drawn without replacement."""
    classes = max(int(eval_labels.max(initial=0)), int(train_labels.max(initial=0))) + 1
    share = np.bincount(train_labels, minlength=classes) / max(len(train_labels), 1)
    quota = np.floor(share * k).astype(int)
    order = np.argsort(-(share * k - quota), kind="stable")
    quota[order[: k - quota.sum()]] += 1
    rng = np.random.default_rng(seed)
    rows = [
        rng.choice(pool, size=min(q, len(pool)), replace=False)
        for c, q in enumerate(quota)
        if q > 0 and len(pool := np.flatnonzero(eval_labels == c))
    ]
    return np.sort(np.concatenate(rows)) if rows else np.arange(0)


def _subset(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` of ``n`` rows, drawn without replacement (all of them if ``k >= n``)."""
    if k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
