"""A method's client side on the shared client protocol: what it installs before training, the
term it adds to every batch's loss, and what it sends back. Methods differ only here (and in
their strategy); the client's loops, data, sampling and messages are the same for all.

    extension.begin(msg, model)                   # before training
    loss = task_loss + extension.loss(features, logits, labels)   # every batch
    records = extension.end(msg, model, embed)    # after training: added to the reply

``features`` are the input of the model's head, ``(B, d)``; ``embed()`` yields
``(features, logits, labels)`` batches of the client's training set under the trained model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Message
from torch import nn

from mergenet_fl import PacketError
from strategies import protocol as p

Embed = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


class ClientExtension:
    """Adds nothing: LocalOnly, GroupFedAvg and MergeNet (whose steps are the protocol's
    :func:`~strategies.client.receive` and :func:`~strategies.client.reply`)."""

    adds_loss = False  # whether :meth:`loss` adds a term (it then reads the head's input)

    def begin(self, msg: Message, model: nn.Module) -> None:
        """Install what the server sent for this round."""

    def loss(
        self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor | None:
        """An extra term for this batch's loss (None: nothing)."""
        return None

    def end(self, msg: Message, model: nn.Module, embed: Embed) -> dict[str, ArrayRecord]:
        """Records to add to the train reply."""
        return {}


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
        self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor
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
