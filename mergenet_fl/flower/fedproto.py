"""FedProto (Tan et al., AAAI 2022) and FD (Jeong et al., 2018): clients send a mean per class
with the class counts — of their features (FedProto's prototypes) or of their logits (FD) —
the server averages them per class (``mean="plain"``: over the clients that have the class,
as HtFLlib and FedProto's code do; ``"weighted"``: by the counts), and each client pulls its
own towards the global mean of their class (``λ · MSE``,
:class:`~mergenet_fl.flower.extension.ClassMeans`). FedProto's evaluate messages carry the global
prototypes, by which HtFLlib scores a client (nearest prototype). Models of any architecture
take part as long as the exchanged width is one: the head's input for FedProto, the number of
classes for FD."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from mergenet_fl import PacketError
from mergenet_fl.flower import protocol as p
from mergenet_fl.flower.base import ClientReply, PeerStrategy

MEANS = ("plain", "weighted")  # a class's global mean: over clients, or over examples


class FedProto(PeerStrategy):
    """Global per-class means ``(C, d)`` of the clients' features; a client whose shape
    differs from the federation's is dropped, naming why."""

    key = p.PROTOS  # the record both ways
    method = "FedProto"
    needs = "one feature width (the head's input) and class count"
    scored_with_means = True  # evaluate messages carry the global means (nearest prototype)

    def __init__(self, mean: str = "plain", **kwargs: Any) -> None:
        if mean not in MEANS:
            raise ValueError(f"mean={mean!r}; choose one of {MEANS}")
        super().__init__(share="none", **kwargs)
        self.mean = mean
        self.means: np.ndarray | None = None  # (C, d)
        self.counts: np.ndarray | None = None  # (C,) examples behind each global mean

    def train_records(
        self, server_round: int, identities: dict[int, p.ClientIdentity]
    ) -> dict[int, dict[str, ArrayRecord]]:
        if self.means is None:
            return {}
        record = {"means": self.means, "counts": self.counts}
        return {nid: {self.key: p.to_record(record)} for nid in identities}

    def evaluate_records(
        self, server_round: int, identities: dict[int, p.ClientIdentity]
    ) -> dict[int, dict[str, ArrayRecord]]:
        return self.train_records(server_round, identities) if self.scored_with_means else {}

    def validate(self, server_round: int, reply: ClientReply) -> None:
        if self.key not in reply.content.array_records:
            raise PacketError(f"{self.method}: the reply carries no {self.key}")
        record = p.from_record(reply.content.array_records[self.key])
        means, counts = record.get("means"), record.get("counts")
        if means is None or counts is None or means.ndim != 2 or counts.shape != means.shape[:1]:
            raise PacketError(f"{self.method}: {self.key} need 'means' (C, d) and 'counts' (C,)")
        if not (np.isfinite(means).all() and np.isfinite(counts).all() and (counts >= 0).all()):
            raise PacketError(f"{self.method}: non-finite {self.key} or negative counts")
        if self.means is not None and means.shape != self.means.shape:
            raise PacketError(
                f"{self.method}: {self.key} of shape {means.shape}, the federation's are "
                f"{self.means.shape}: the method needs {self.needs}"
            )
        reply.extras["means"] = (means.astype(np.float64), counts.astype(np.float64))

    def absorb(self, server_round: int, replies: list[ClientReply]) -> dict[str, Any]:
        parts = self.class_means(replies)
        if not parts:
            return {}
        counts = sum(c for _, c in parts)
        weights = [c if self.mean == "weighted" else (c > 0).astype(np.float64) for _, c in parts]
        total = sum(weights)
        sums = sum(means * w[:, None] for (means, _), w in zip(parts, weights, strict=True))
        self.means = (sums / np.maximum(total, 1e-12)[:, None]).astype(np.float32)
        self.counts = counts.astype(np.float32)
        return {"classes": int((counts > 0).sum())}

    def class_means(self, replies: list[ClientReply]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each reply's ``(means (C, d), counts (C,))``, of one shape for all."""
        parts = [r.extras["means"] for r in replies]
        shapes = {means.shape for means, _ in parts}
        if len(shapes) > 1:  # the first round: no reference yet to drop the odd ones against
            raise ValueError(
                f"{self.method} needs {self.needs} for all clients, got {sorted(shapes)}"
            )
        return parts

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "means": self.means, "counts": self.counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.means, self.counts = state["means"], state["counts"]


class FD(FedProto):
    """Federated distillation: the same per-class averaging, of the logits ``(C, C)``."""

    key = p.LOGITS
    method = "FD"
    needs = "one class count"
    scored_with_means = False
