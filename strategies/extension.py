"""A method's client side on the shared client protocol: what it installs before training, the
term it adds to every batch's loss, and what it sends back. Methods differ only here (and in
their strategy); the client's loops, data, sampling and messages are the same for all.

    extension.begin(msg, model)                   # before training
    loss = task_loss + extension.loss(features, logits, labels, forward)   # every batch
    records = extension.end(msg, model, embed)    # after training: added to the reply

``features`` are the input of the model's head, ``(B, d)``; ``forward(other, head)`` runs the
same batch through another model (FML's shared model, FedKD's mentee: the method's
:meth:`~ClientExtension.modules`, which train beside the client's model and which the client
keeps from round to round); ``embed()`` yields ``(features, logits, labels)`` batches of the
client's training set under the trained model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Message
from torch import nn

from mergenet_fl import InstalledLayer, PacketError, SelectedLayer
from strategies import client as mc
from strategies import protocol as p

Embed = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
#: This batch through another model: ``forward(other, head) -> (features (B, d), logits (B, C))``
#: with ``features`` the input of ``other``'s module ``head``.
Forward = Callable[[nn.Module, str], tuple[torch.Tensor, torch.Tensor]]


class ClientExtension:
    """Adds nothing: LocalOnly and GroupFedAvg (the group's averaged parameters, which every
    method may use, are the protocol's: :func:`~strategies.client.load_group`)."""

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

    def end(self, msg: Message, model: nn.Module, embed: Embed) -> dict[str, ArrayRecord]:
        """Records to add to the train reply."""
        return {}


class MergeNetClient(ClientExtension):
    """MergeNet's client: before training it installs ``W + A'B' − AB`` in its transfer
    ``layers`` with the server's merged factors; after, it sends its knowledge packet (rank
    ``rank``) when the server asks for one, and the gradient pieces of what it installed
    (:func:`~strategies.client.install_factors`, :func:`~strategies.client.knowledge_records`:
    the steps :func:`~strategies.client.receive` and :func:`~strategies.client.reply` take)."""

    def __init__(self, layers: Sequence[SelectedLayer], rank: int) -> None:
        self.layers, self.rank = layers, rank
        self.installed: dict[str, InstalledLayer] = {}

    def begin(self, msg: Message, model: nn.Module) -> None:
        self.installed = mc.install_factors(msg, model, self.layers, rank=self.rank)

    def end(self, msg: Message, model: nn.Module, embed: Embed) -> dict[str, ArrayRecord]:
        records, self.manifest = mc.knowledge_records(
            msg, model, self.layers, self.installed, rank=self.rank
        )
        return records


class SharedHead(ClientExtension):
    """LG-FedAvg's client: the head (``head``: its module name) is averaged over every client,
    the feature extractor stays local. The head travels as ``weight`` and ``bias``, whatever its
    module is called, so that models of different architectures share it."""

    def __init__(self, head: str) -> None:
        self.head = head

    def begin(self, msg: Message, model: nn.Module) -> None:
        if p.HEAD not in msg.content.array_records:
            return
        module = model.get_submodule(self.head)
        head = p.from_record(msg.content.array_records[p.HEAD])
        if set(head) != {"weight", "bias"} or not p.fits(head, module.state_dict()):
            shapes = {k: tuple(v.shape) for k, v in head.items()}
            raise PacketError(
                f"the global head {shapes} does not fit this model's {self.head!r} "
                f"({tuple(module.weight.shape)}): LG-FedAvg needs one head shape for all clients"
            )
        module.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in head.items()})

    def end(self, msg: Message, model: nn.Module, embed: Embed) -> dict[str, ArrayRecord]:
        module = model.get_submodule(self.head)
        return {
            p.HEAD: p.to_record(
                {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
            )
        }


class ClassMeans(ClientExtension):
    """The client of FedProto and FD: pulls each example's ``of`` (``features``: the head's
    input, FedProto's prototypes; ``logits``: FD's per-class average logits) towards the
    server's mean for its class (``weight`` · MSE), and sends the mean per class over its
    training set, with the class counts, as record ``key``."""

    adds_loss = True

    def __init__(self, num_classes: int, weight: float = 1.0, of: str = "features") -> None:
        if of not in ("features", "logits"):
            raise ValueError(f"ClassMeans of {of!r}; choose 'features' or 'logits'")
        self.num_classes, self.weight, self.of = num_classes, weight, of
        self.key = p.PROTOS if of == "features" else p.LOGITS
        self.means: torch.Tensor | None = None  # (C, d), the server's
        self.present: torch.Tensor | None = None  # (C,) bool: classes the server has seen

    def begin(self, msg: Message, model: nn.Module) -> None:
        self.means = self.present = None
        if self.key not in msg.content.array_records:
            return
        record = p.from_record(msg.content.array_records[self.key])
        means, counts = record.get("means"), record.get("counts")
        if means is None or counts is None or means.ndim != 2 or counts.shape != means.shape[:1]:
            raise PacketError(f"global {self.key} need 'means' (C, d) and 'counts' (C,)")
        self.means = torch.from_numpy(means.astype(np.float32))
        self.present = torch.from_numpy(counts > 0)

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


def _kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) per example (``batchmean``), the teacher's logits held fixed."""
    return F.kl_div(
        F.log_softmax(student, dim=1), F.softmax(teacher.detach(), dim=1), reduction="batchmean"
    )


class MutualLearning(ClientExtension):
    """FML's client: a shared model (one architecture for the whole federation; ``head``: its
    output module) trains beside the client's own, each learning from the labels and from the
    other's predictions (deep mutual learning, the other's held fixed)::

        own:    α·CE + (1 − α)·KL(shared ‖ own)
        shared: β·CE + (1 − β)·KL(own ‖ shared)

    It installs the server's average when one comes, and sends its floating ``state_dict``
    entries back (record ``shared-model``)."""

    adds_loss = True

    def __init__(self, shared: nn.Module, head: str, alpha: float = 0.5, beta: float = 0.5) -> None:
        if not (0.0 <= alpha <= 1.0 and 0.0 <= beta <= 1.0):
            raise ValueError(f"alpha and beta must be in [0, 1], got {alpha}, {beta}")
        self.shared, self.head, self.alpha, self.beta = shared, head, alpha, beta

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
            + (1.0 - self.alpha) * _kl(logits, shared_logits)
            + self.beta * F.cross_entropy(shared_logits, labels)
            + (1.0 - self.beta) * _kl(shared_logits, logits)
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
        self, shared: nn.Module, head: str, own_width: int, mentee_width: int, seed: int = 0
    ) -> None:
        super().__init__(shared, head)
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
            _kl(logits, mentee_logits) + _kl(mentee_logits, logits) + 2.0 * hidden
        )

    def end(self, msg: Message, model: nn.Module, embed: Embed) -> dict[str, ArrayRecord]:
        return {p.SHARED_MODEL: p.to_record(p.compress_state(self.sent(), self.energy))}
