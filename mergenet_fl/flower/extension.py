"""A method's client side on the shared client protocol: what it installs before training, the
term it adds to every batch's loss, and what it sends back. Methods differ only here (and in
their strategy); the client's loops, data, sampling and messages are the same for all.

    extension.begin(msg, model)                   # before training
    loss = task_loss + extension.loss(features, logits, labels, forward)   # every batch
    extension.after_step(model, steps)            # after every optimiser step
    records = extension.end(msg, model, embed)    # after training: added to the reply
    scored = extension.scored(msg, model)         # evaluation: the model as the method scores

``features`` are the input of the model's head, ``(B, d)``; ``forward(other, head)`` runs the
same batch through another model (FML's shared model, FedKD's mentee: the method's
:meth:`~ClientExtension.modules`, which train beside the client's model and which the client
keeps from round to round); ``embed()`` yields ``(features, logits, labels)`` batches of the
client's training set under the trained model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from copy import deepcopy

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Message
from torch import nn

from mergenet_fl import FactorPair, InstalledLayer, PacketError, SelectedLayer, gradient_pieces
from mergenet_fl.flower import client as mc
from mergenet_fl.flower import protocol as p

Embed = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
#: This batch through another model: ``forward(other, head) -> (features (B, d), logits (B, C))``
#: with ``features`` the input of ``other``'s module ``head``.
Forward = Callable[[nn.Module, str], tuple[torch.Tensor, torch.Tensor]]


class ClientExtension:
    """Adds nothing: LocalOnly and GroupFedAvg (the group's averaged parameters, which every
    method may use, are the protocol's: :func:`~mergenet_fl.flower.client.load_group`)."""

    adds_loss = False  # whether :meth:`loss` adds a term (it then reads the head's input)
    manifest = ""  # the manifest of a knowledge packet in :meth:`end`'s records (MergeNet)

    def modules(self) -> dict[str, nn.Module]:
        """Models the method trains beside the client's own (their parameters join its
        optimiser); the client keeps their state from one round to the next."""
        return {}

    def begin(self, msg: Message, model: nn.Module) -> None:
        """Install what the server sent for this round."""

    def loss(
        self,
        features: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        forward: Forward,
    ) -> torch.Tensor | None:
        """An extra term for this batch's loss (None: nothing)."""
        return None

    def after_step(self, model: nn.Module, steps: int) -> None:
        """Called after each of the round's optimiser steps (``steps``: done so far)."""

    def end(self, msg: Message, model: nn.Module, embed: Embed) -> dict[str, ArrayRecord]:
        """Records to add to the train reply."""
        return {}

    def scored(self, msg: Message, model: nn.Module) -> nn.Module:
        """The model an evaluate message scores (``model`` itself, or a copy with what the
        server sent for scoring in place: LG-FedAvg's head, FedProto's prototypes)."""
        return model


class MergeNetClient(ClientExtension):
    """MergeNet's client: before training it installs ``W + A'B' − AB`` in its transfer
    ``layers`` with the server's merged factors; after, it sends its knowledge packet (rank
    ``rank``) when the server asks for one, and the gradient pieces of what it installed
    (:func:`~mergenet_fl.flower.client.install_factors`,
    :func:`~mergenet_fl.flower.client.knowledge_records`: the steps
    :func:`~mergenet_fl.flower.client.receive` and :func:`~mergenet_fl.flower.client.reply`
    take).

    ``delta_steps``: the pieces measure ``Δ`` over the round's first ``delta_steps`` optimiser
    steps, and the rest of the round is self-learning (the reference code's one step, then
    ``T_cyc − 1`` batches alone); None: over the whole round.
    """

    def __init__(
        self, layers: Sequence[SelectedLayer], rank: int, delta_steps: int | None = None
    ) -> None:
        if delta_steps is not None and delta_steps < 1:
            raise ValueError(f"delta_steps must be >= 1 or None, got {delta_steps}")
        self.layers, self.rank, self.delta_steps = layers, rank, delta_steps
        self.installed: dict[str, InstalledLayer] = {}
        self.pieces: dict[str, FactorPair] | None = None

    def begin(self, msg: Message, model: nn.Module) -> None:
        self.installed = mc.install_factors(msg, model, self.layers, rank=self.rank)
        self.pieces = None

    def after_step(self, model: nn.Module, steps: int) -> None:
        if self.installed and steps == self.delta_steps:
            self.pieces = gradient_pieces(model, self.layers, self.installed)

    def end(self, msg: Message, model: nn.Module, embed: Embed) -> dict[str, ArrayRecord]:
        records, self.manifest = mc.knowledge_records(
            msg, model, self.layers, self.installed, rank=self.rank, pieces=self.pieces
        )
        return records


HEAD_SCORES = ("global", "local")  # scored with the server's head, or with the client's own
MEAN_SCORES = ("prototype", "head")  # nearest global class mean, or the model's own head


def install_head(msg: Message, model: nn.Module, head: str) -> None:
    """Load the server's head (record ``head``: ``weight``, ``bias``), when the message carries
    one, into module ``head`` of ``model``."""
    if p.HEAD not in msg.content.array_records:
        return
    module = model.get_submodule(head)
    arrays = p.from_record(msg.content.array_records[p.HEAD])
    if set(arrays) != {"weight", "bias"} or not p.fits(arrays, module.state_dict()):
        shapes = {k: tuple(v.shape) for k, v in arrays.items()}
        raise PacketError(
            f"the global head {shapes} does not fit this model's {head!r} "
            f"({tuple(module.weight.shape)}): the method needs one head shape for all clients"
        )
    module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})


def with_head(msg: Message, model: nn.Module, head: str) -> nn.Module:
    """A copy of ``model`` with the server's head installed (``model`` when none came)."""
    if p.HEAD not in msg.content.array_records:
        return model
    copy = deepcopy(model)
    install_head(msg, copy, head)
    return copy


class NearestMean(nn.Module):
    """A head that scores features by their distance to class means: logits ``−‖x − μ_c‖²/d``
    (HtFLlib's MSE), classes without a mean ruled out. ``means: (C, d)``, ``present: (C,)``."""

    def __init__(self, means: torch.Tensor, present: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("means", means)
        self.register_buffer("present", present)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features: (B, d)`` -> logits ``(B, C)``."""
        x, means = features.float(), self.means.to(features.device)
        distance = torch.cdist(x, means).square() / means.shape[1]
        return (-distance).masked_fill(~self.present.to(features.device), -1e9)


def read_means(msg: Message, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The server's class means in record ``key``: ``means (C, d)`` and ``present (C,)``
    (classes with a count); None when the message carries none."""
    if key not in msg.content.array_records:
        return None
    record = p.from_record(msg.content.array_records[key])
    means, counts = record.get("means"), record.get("counts")
    if means is None or counts is None or means.ndim != 2 or counts.shape != means.shape[:1]:
        raise PacketError(f"global {key} need 'means' (C, d) and 'counts' (C,)")
    if not np.isfinite(means).all():
        raise PacketError(f"global {key} are not finite")
    return torch.from_numpy(means.astype(np.float32)), torch.from_numpy(counts > 0)


class SharedHead(ClientExtension):
    """LG-FedAvg's client: the head (``head``: its module name) is averaged over every client,
    the feature extractor stays local. The head travels as ``weight`` and ``bias``, whatever its
    module is called, so that models of different architectures share it."""

    def __init__(self, head: str, score: str = "global") -> None:
        if score not in HEAD_SCORES:
            raise ValueError(f"score={score!r}; choose one of {HEAD_SCORES}")
        self.head, self.score = head, score

    def begin(self, msg: Message, model: nn.Module) -> None:
        install_head(msg, model, self.head)

    def scored(self, msg: Message, model: nn.Module) -> nn.Module:
        """With the global head installed, as HtFLlib scores LG-FedAvg (``score=local``: the
        client's own head, after its local training)."""
        return with_head(msg, model, self.head) if self.score == "global" else model

    def end(self, msg: Message, model: nn.Module, embed: Embed) -> dict[str, ArrayRecord]:
        module = model.get_submodule(self.head)
        return {
            p.HEAD: p.to_record(
                {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
            )
        }


class ClassMeans(ClientExtension):
    """The client of FedProto, FedTGP and FD: pulls each example's ``of`` (``features``: the
    head's input, FedProto's prototypes; ``logits``: FD's per-class average logits) towards
    the server's mean for its class (``weight`` · MSE), and sends the mean per class over its
    training set, with the class counts, as record ``key``. ``score="prototype"`` (features
    only) scores a client by the nearest global prototype, as HtFLlib scores FedProto and
    FedTGP (:class:`NearestMean`, with the means of the evaluate message); ``"head"``: by its
    own head."""

    def __init__(
        self,
        num_classes: int,
        weight: float = 1.0,
        of: str = "features",
        score: str = "head",
        head: str = "",
    ) -> None:
        if of not in ("features", "logits"):
            raise ValueError(f"ClassMeans of {of!r}; choose 'features' or 'logits'")
        if score not in MEAN_SCORES or (score == "prototype" and of != "features"):
            raise ValueError(f"score={score!r}; choose 'head', or 'prototype' for features")
        if score == "prototype" and not head:
            raise ValueError("prototype scoring needs the head's module name (head=...)")
        self.num_classes, self.weight, self.of, self.score = num_classes, weight, of, score
        self.head = head  # the module the prototypes replace when scoring
        self.key = p.PROTOS if of == "features" else p.LOGITS
        self.adds_loss = weight > 0
        self.means: torch.Tensor | None = None  # (C, d), the server's
        self.present: torch.Tensor | None = None  # (C,) bool: classes the server has seen

    def begin(self, msg: Message, model: nn.Module) -> None:
        self.means, self.present = read_means(msg, self.key) or (None, None)

    def scored(self, msg: Message, model: nn.Module) -> nn.Module:
        received = read_means(msg, self.key) if self.score == "prototype" else None
        if received is None:
            return model
        copy = deepcopy(model)
        copy.set_submodule(self.head, NearestMean(*received))
        return copy

    def loss(
        self,
        features: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        forward: Forward,
    ) -> torch.Tensor | None:
        if self.means is None:
            return None
        values = features if self.of == "features" else logits
        if self.means.shape[1] != values.shape[1]:
            raise PacketError(
                f"global {self.key} have width {self.means.shape[1]}, this model's "
                f"{self.of} {values.shape[1]}: the method needs one width for all clients"
            )
        known = self.present.to(labels.device)[labels]
        if not known.any():
            return None
        target = self.means.to(values)[labels[known]]
        return self.weight * F.mse_loss(values[known], target)

    @torch.no_grad()
    def end(self, msg: Message, model: nn.Module, embed: Embed) -> dict[str, ArrayRecord]:
        sums: torch.Tensor | None = None
        counts = torch.zeros(self.num_classes, dtype=torch.float64)
        for features, logits, labels in embed():
            values = (features if self.of == "features" else logits).double().cpu()
            labels = labels.cpu()
            if sums is None:
                sums = torch.zeros(self.num_classes, values.shape[1], dtype=torch.float64)
            sums.index_add_(0, labels, values)
            counts += torch.bincount(labels, minlength=self.num_classes).double()
        if sums is None:
            return {}
        means = sums / counts.clamp_min(1.0)[:, None]
        return {
            self.key: p.to_record(
                {"means": means.float().numpy(), "counts": counts.float().numpy()}
            )
        }


class GlobalHead(ClassMeans):
    """FedGH's client: trains on its task loss alone with the server's head installed (before
    training and for scoring, as HtFLlib does), and sends its class prototypes, on which the
    server trains that head."""

    def __init__(self, num_classes: int, head: str) -> None:
        super().__init__(num_classes, weight=0.0, of="features", head=head)

    def begin(self, msg: Message, model: nn.Module) -> None:
        install_head(msg, model, self.head)

    def scored(self, msg: Message, model: nn.Module) -> nn.Module:
        return with_head(msg, model, self.head)


KL_REDUCTIONS = ("batchmean", "mean")  # per example (the KL's definition) | per class too


def _kl(student: torch.Tensor, teacher: torch.Tensor, reduction: str) -> torch.Tensor:
    """KL(teacher ‖ student), the teacher's logits held fixed: ``batchmean`` per example;
    ``mean`` also over classes (``nn.KLDivLoss()``'s default, HtFLlib's: 1/C as strong; written
    out here, as PyTorch means to change what its ``mean`` does)."""
    kl = F.kl_div(
        F.log_softmax(student, dim=1), F.softmax(teacher.detach(), dim=1), reduction="batchmean"
    )
    return kl / student.shape[1] if reduction == "mean" else kl


class MutualLearning(ClientExtension):
    """FML's client: a shared model (one architecture for the whole federation; ``head``: its
    output module) trains beside the client's own, each learning from the labels and from the
    other's predictions (deep mutual learning, the other's held fixed)::

        own:    α·CE + (1 − α)·KL(shared ‖ own)
        shared: β·CE + (1 − β)·KL(own ‖ shared)

    It installs the server's average when one comes, and sends its floating ``state_dict``
    entries back (record ``shared-model``)."""

    adds_loss = True

    def __init__(
        self,
        shared: nn.Module,
        head: str,
        alpha: float = 0.5,
        beta: float = 0.5,
        kl: str = "batchmean",
    ) -> None:
        if not (0.0 <= alpha <= 1.0 and 0.0 <= beta <= 1.0):
            raise ValueError(f"alpha and beta must be in [0, 1], got {alpha}, {beta}")
        if kl not in KL_REDUCTIONS:
            raise ValueError(f"kl={kl!r}; choose one of {KL_REDUCTIONS}")
        self.shared, self.head, self.alpha, self.beta, self.kl = shared, head, alpha, beta, kl

    def modules(self) -> dict[str, nn.Module]:
        return {"shared": self.shared}

    def begin(self, msg: Message, model: nn.Module) -> None:
        if p.SHARED_MODEL not in msg.content.array_records:
            return  # round 1: every client built the same initial shared model
        self.install(self.received(msg))

    def received(self, msg: Message) -> dict[str, np.ndarray]:
        """The shared model in a train message, as named arrays."""
        return p.from_record(msg.content.array_records[p.SHARED_MODEL])

    def install(self, state: dict[str, np.ndarray]) -> None:
        own = self.shared.state_dict()
        if set(state) != set(self.sent()) or any(state[k].size != own[k].numel() for k in state):
            raise PacketError(
                "the server's shared model does not fit this client's: every client must build "
                "the same shared architecture"
            )
        self.shared.load_state_dict(
            {k: torch.from_numpy(v.reshape(own[k].shape).copy()) for k, v in state.items()},
            strict=False,
        )

    def sent(self) -> dict[str, np.ndarray]:
        """The shared model's floating entries (parameters and BatchNorm statistics)."""
        return {
            k: v.detach().cpu().numpy()
            for k, v in self.shared.state_dict().items()
            if v.is_floating_point()
        }

    def loss(
        self,
        features: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        forward: Forward,
    ) -> torch.Tensor | None:
        _, shared_logits = forward(self.shared, self.head)
        own_ce = F.cross_entropy(logits, labels)  # the task already adds it once, weight 1
        return (
            (self.alpha - 1.0) * own_ce
            + (1.0 - self.alpha) * _kl(logits, shared_logits, self.kl)
            + self.beta * F.cross_entropy(shared_logits, labels)
            + (1.0 - self.beta) * _kl(shared_logits, logits, self.kl)
        )

    def end(self, msg: Message, model: nn.Module, embed: Embed) -> dict[str, ArrayRecord]:
        return {p.SHARED_MODEL: p.to_record(self.sent())}


class MentorMentee(MutualLearning):
    """FedKD's client: the client's model (mentor) and the shared mentee distil each other with
    weights that shrink while their predictions are poor, and align their features through a
    local projection ``W_h: (d_mentee → d_own)`` (kept by the client)::

        w = 1 / (CE_own + CE_mentee)            (held fixed)
        own:    CE_own    + w·KL(mentee ‖ own) + w·MSE(features, W_h · mentee features)
        mentee: CE_mentee + w·KL(own ‖ mentee) + the same MSE

    The mentee travels as truncated-SVD factors both ways (energy: the round's ``svd-energy``).
    """

    def __init__(
        self,
        shared: nn.Module,
        head: str,
        own_width: int,
        mentee_width: int,
        seed: int = 0,
        kl: str = "batchmean",
    ) -> None:
        super().__init__(shared, head, kl=kl)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.projection = nn.Linear(mentee_width, own_width, bias=False)
        self.energy = 1.0

    def modules(self) -> dict[str, nn.Module]:
        return {"shared": self.shared, "projection": self.projection}

    def begin(self, msg: Message, model: nn.Module) -> None:
        config = msg.content.config_records.get(p.CONFIG, {})
        energy = config.get(p.ENERGY, 1.0)
        if not isinstance(energy, float) or not 0.0 < energy <= 1.0:
            raise PacketError(f"FedKD: svd-energy {energy!r} is not in (0, 1]")
        self.energy = energy
        super().begin(msg, model)

    def received(self, msg: Message) -> dict[str, np.ndarray]:
        return p.recover_state(super().received(msg))

    def loss(
        self,
        features: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        forward: Forward,
    ) -> torch.Tensor | None:
        mentee_features, mentee_logits = forward(self.shared, self.head)
        own_ce = F.cross_entropy(logits, labels)
        mentee_ce = F.cross_entropy(mentee_logits, labels)
        weight = 1.0 / (own_ce + mentee_ce).detach().clamp_min(1e-6)
        hidden = F.mse_loss(features, self.projection(mentee_features))
        return mentee_ce + weight * (
            _kl(logits, mentee_logits, self.kl) + _kl(mentee_logits, logits, self.kl) + 2.0 * hidden
        )

    def end(self, msg: Message, model: nn.Module, embed: Embed) -> dict[str, ArrayRecord]:
        return {p.SHARED_MODEL: p.to_record(p.compress_state(self.sent(), self.energy))}
