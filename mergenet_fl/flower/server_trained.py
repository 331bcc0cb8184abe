"""Methods whose server trains a module on the clients' class prototypes (HtFLlib's FedTGP and
FedGH): clients send FedProto's per-class mean features
(:class:`~mergenet_fl.flower.fedproto.FedProto` validates them), the server fits its module on
the ``(prototype, class)`` pairs of the round for ``epochs`` passes of SGD in batches of
``batch_size``, and sends what it learnt.

- **FedTGP** (Zhang et al., AAAI 2024): trainable global prototypes
  (:class:`PrototypeGenerator`), learnt with a margin that keeps classes apart; clients pull
  their features towards them (``λ · MSE``) and are scored by the nearest one.
- **FedGH** (Yi et al., ACM MM 2023): one global head trained on the prototypes; clients
  install it before training and for scoring.

The server's training is seeded with the strategy's seed and the round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord
from torch import nn

from mergenet_fl.flower import protocol as p
from mergenet_fl.flower.base import ClientReply
from mergenet_fl.flower.fedproto import FedProto

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class PrototypeGenerator(nn.Module):
    """FedTGP's global prototypes: ``Embedding(C, d) → Linear(d, h) + ReLU → Linear(h, d)``."""

    def __init__(self, num_classes: int, width: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_classes, width)
        self.middle = nn.Sequential(nn.Linear(width, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, width)

    def forward(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``classes: (K,)`` int64 (default: every class) -> prototypes ``(K, d)``."""
        if classes is None:
            classes = torch.arange(self.embedding.num_embeddings)
        return self.out(self.middle(self.embedding(classes)))


def prototype_pairs(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, ...]:
    """Every client's mean of every class it has, as ``features (N, d)`` float32 and
    ``labels (N,)`` int64 (``parts``: each client's ``means (C, d)``, ``counts (C,)``)."""
    features = [means[counts > 0] for means, counts in parts]
    labels = [np.flatnonzero(counts > 0) for _, counts in parts]
    return (
        torch.from_numpy(np.concatenate(features).astype(np.float32)),
        torch.from_numpy(np.concatenate(labels).astype(np.int64)),
    )


def class_gap(parts: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """FedTGP's adaptive margin before its threshold: the largest, over classes, of a class's
    distance to its nearest other class, with each class's centre the plain mean over the
    clients that have it (a class with no neighbour counts the smallest gap)."""
    present = sum((c > 0).astype(np.float64) for _, c in parts)
    sums = sum(m * (c > 0)[:, None] for m, c in parts)
    known = present > 0
    if known.sum() < 2:
        return 0.0
    centres = sums[known] / present[known][:, None]
    distance = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    np.fill_diagonal(distance, np.inf)
    return float(distance.min(axis=1).max())


def fit(
    module: nn.Module,
    loss: Loss,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> float:
    """``epochs`` shuffled passes of plain SGD of ``loss(features_batch, labels_batch)`` over
    ``module``'s parameters; the mean loss of the last pass."""
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    module.train()
    last = 0.0
    for _ in range(epochs):
        total = 0.0
        for rows in torch.randperm(len(labels), generator=order).split(batch_size):
            value = loss(features[rows], labels[rows])
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            total += value.item() * len(rows)
        last = total / len(labels)
    module.eval()
    return last


def _seeded_module(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _state(module: nn.Module | None) -> dict[str, np.ndarray] | None:
    if module is None:
        return None
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


class _ServerTrained(FedProto):
    """FedProto's replies and global means (the shape every later reply must have), and a
    module the server trains on the replies (built at the first round with replies, when the
    width and class count are known)."""

    def __init__(
        self,
        *,
        server_epochs: int = 100,
        server_batch_size: int = 10,
        server_lr: float = 0.01,
        **kwargs: Any,
    ) -> None:
        for name, value in (
            ("server_epochs", server_epochs),
            ("server_batch_size", server_batch_size),
        ):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr!r}")
        super().__init__(**kwargs)
        self.server_epochs, self.server_batch_size, self.server_lr = (
            server_epochs,
            server_batch_size,
            server_lr,
        )
        self.module: nn.Module | None = None

    def build(self, num_classes: int, width: int) -> nn.Module:
        """The server's module for ``num_classes`` classes of ``width``-d features."""
        raise NotImplementedError

    def loss(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[Loss, dict[str, Any]]:
        """This round's loss of a batch, and what to log about it."""
        raise NotImplementedError

    def absorb(self, server_round: int, replies: list[ClientReply]) -> dict[str, Any]:
        record = super().absorb(server_round, replies)  # the plain means: the shape reference
        if not record:
            return {}
        parts = self.class_means(replies)
        num_classes, width = parts[0][0].shape
        if self.module is None:
            self.module = _seeded_module(self.seed, lambda: self.build(num_classes, width))
        features, labels = prototype_pairs(parts)
        loss, logged = self.loss(parts)
        record.update(logged)
        record["server_loss"] = fit(
            self.module,
            loss,
            features,
            labels,
            epochs=self.server_epochs,
            batch_size=self.server_batch_size,
            lr=self.server_lr,
            seed=self.seed * 100_003 + server_round,
        )
        record["pairs"] = len(labels)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "module": _state(self.module)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved = state["module"]
        if saved is None:
            self.module = None
            return
        num_classes, width = self.shape_of(saved)
        self.module = self.build(num_classes, width)
        self.module.load_state_dict({k: torch.from_numpy(v) for k, v in saved.items()})
        self.module.eval()

    @staticmethod
    def shape_of(state: dict[str, np.ndarray]) -> tuple[int, int]:
        """``(classes, width)`` of a saved module."""
        raise NotImplementedError


class FedTGP(_ServerTrained):
    """FedTGP's server: trainable global prototypes, fitted each round on the clients'
    prototypes with ``CE(−(‖x − P_c‖ + margin · onehot))``, ``margin = min(gap,
    margin_threshold)`` (:func:`class_gap`); every class's prototype goes to every client."""

    method = "FedTGP"

    def __init__(self, margin_threshold: float = 100.0, hidden: int | None = None, **kwargs: Any):
        if not margin_threshold >= 0:
            raise ValueError(f"margin_threshold must be >= 0, got {margin_threshold!r}")
        super().__init__(**kwargs)
        self.margin_threshold, self.hidden = float(margin_threshold), hidden

    def build(self, num_classes: int, width: int) -> nn.Module:
        return PrototypeGenerator(num_classes, width, self.hidden or width)

    @staticmethod
    def shape_of(state: dict[str, np.ndarray]) -> tuple[int, int]:
        return state["embedding.weight"].shape

    def loss(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[Loss, dict[str, Any]]:
        margin = min(class_gap(parts), self.margin_threshold)
        generator = self.module
        assert generator is not None

        def separated(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            prototypes = generator()  # (C, d)
            squared = (
                features.square().sum(1, keepdim=True)
                - 2 * features @ prototypes.T
                + prototypes.square().sum(1)[None]
            )
            distance = squared.clamp_min(1e-12).sqrt()  # (B, C)
            distance = distance + margin * F.one_hot(labels, prototypes.shape[0])
            return F.cross_entropy(-distance, labels)

        return separated, {"margin": margin}

    def absorb(self, server_round: int, replies: list[ClientReply]) -> dict[str, Any]:
        record = super().absorb(server_round, replies)
        if record:
            with torch.no_grad():
                self.means = self.module().numpy().astype(np.float32)
            self.counts = np.ones(len(self.means), dtype=np.float32)  # every class, as HtFLlib
            record["classes"] = len(self.means)
        return record


class FedGH(_ServerTrained):
    """FedGH's server: one global head ``Linear(d, C)``, trained each round on the clients'
    prototypes with cross-entropy; it goes to every client (record ``head``)."""

    method = "FedGH"
    scored_with_means = False

    def build(self, num_classes: int, width: int) -> nn.Module:
        return nn.Linear(width, num_classes)

    @staticmethod
    def shape_of(state: dict[str, np.ndarray]) -> tuple[int, int]:
        return state["weight"].shape

    def loss(self, parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[Loss, dict[str, Any]]:
        head = self.module
        assert head is not None
        return (lambda features, labels: F.cross_entropy(head(features), labels)), {}

    def head_records(
        self, identities: dict[int, p.ClientIdentity]
    ) -> dict[int, dict[str, ArrayRecord]]:
        if self.module is None:
            return {}
        record = p.to_record(_state(self.module))
        return {nid: {p.HEAD: record} for nid in identities}

    def train_records(
        self, server_round: int, identities: dict[int, p.ClientIdentity]
    ) -> dict[int, dict[str, ArrayRecord]]:
        return self.head_records(identities)

    def evaluate_records(
        self, server_round: int, identities: dict[int, p.ClientIdentity]
    ) -> dict[int, dict[str, ArrayRecord]]:
        return self.head_records(identities)
