"""FedProto (Tan et al., AAAI 2022): clients send the mean features of each class (their
prototypes) with the class counts; the server averages them per class, weighted by the counts,
and each client pulls its features towards the global prototype of their class
(``λ · MSE``, :class:`~strategies.extension.Prototypes`). Models of any architecture take part
as long as their heads read features of one width."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from mergenet_fl import PacketError
from strategies import protocol as p
from strategies.base import ClientReply, PeerStrategy


class FedProto(PeerStrategy):
    """Global prototypes ``(C, d)`` from the clients'; a client whose feature width or class
    count differs from the federation's is dropped, naming why."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(share="none", **kwargs)
        self.protos: np.ndarray | None = None  # (C, d)
        self.counts: np.ndarray | None = None  # (C,) examples behind each global prototype

    def train_records(
        self, server_round: int, identities: dict[int, p.ClientIdentity]
    ) -> dict[int, dict[str, ArrayRecord]]:
        if self.protos is None:
            return {}
        record = {"protos": self.protos, "counts": self.counts}
        return {nid: {p.PROTOS: p.to_record(record)} for nid in identities}

    def validate(self, server_round: int, reply: ClientReply) -> None:
        if p.PROTOS not in reply.content.array_records:
            raise PacketError("FedProto: the reply carries no prototypes")
        record = p.from_record(reply.content.array_records[p.PROTOS])
        protos, counts = record.get("protos"), record.get("counts")
        if protos is None or counts is None or protos.ndim != 2 or counts.shape != protos.shape[:1]:
            raise PacketError("FedProto: prototypes need 'protos' (C, d) and 'counts' (C,)")
        if not (np.isfinite(protos).all() and np.isfinite(counts).all() and (counts >= 0).all()):
            raise PacketError("FedProto: non-finite prototypes or negative counts")
        if self.protos is not None and protos.shape != self.protos.shape:
            raise PacketError(
                f"FedProto: prototypes of shape {protos.shape}, the federation's are "
                f"{self.protos.shape}: the method needs one feature width and class count"
            )
        reply.extras["protos"] = (protos.astype(np.float64), counts.astype(np.float64))

    def absorb(self, server_round: int, replies: list[ClientReply]) -> dict[str, Any]:
        parts = [r.extras["protos"] for r in replies]
        if not parts:
            return {}
        shapes = {protos.shape for protos, _ in parts}
        if len(shapes) > 1:  # the first round: no reference yet to drop the odd ones against
            raise ValueError(
                f"FedProto needs one feature width and class count for all clients, got "
                f"{sorted(shapes)}; use a federation whose heads read features of one width"
            )
        counts = sum(c for _, c in parts)
        sums = sum(protos * c[:, None] for protos, c in parts)
        self.protos = (sums / np.maximum(counts, 1.0)[:, None]).astype(np.float32)
        self.counts = counts.astype(np.float32)
        return {"classes": int((counts > 0).sum())}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "protos": self.protos, "counts": self.counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.protos, self.counts = state["protos"], state["counts"]
