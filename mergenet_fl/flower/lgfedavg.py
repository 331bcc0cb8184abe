"""LG-FedAvg (Liang et al., 2020) in HtFLlib's heterogeneous form: every client keeps its own
feature extractor, and the classifier head is averaged over all clients, example-weighted.
Its client side is :class:`~mergenet_fl.flower.extension.SharedHead`."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from mergenet_fl import PacketError
from mergenet_fl.flower import protocol as p
from mergenet_fl.flower.base import ClientReply, PeerStrategy


class LGFedAvg(PeerStrategy):
    """Averages one head shape across every architecture; a client whose head has another
    shape is dropped, naming why (the method does not apply to it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(share="none", **kwargs)
        self.head: dict[str, np.ndarray] = {}  # the global head: "weight", "bias"

    def train_records(
        self, server_round: int, identities: dict[int, p.ClientIdentity]
    ) -> dict[int, dict[str, ArrayRecord]]:
        if not self.head:
            return {}
        return {nid: {p.HEAD: p.to_record(self.head)} for nid in identities}

    def validate(self, server_round: int, reply: ClientReply) -> None:
        if p.HEAD not in reply.content.array_records:
            raise PacketError("LG-FedAvg: the reply carries no head")
        head = p.from_record(reply.content.array_records[p.HEAD])
        if set(head) != {"weight", "bias"}:
            raise PacketError(f"LG-FedAvg: head arrays {sorted(head)}, expected weight and bias")
        if not all(np.isfinite(v).all() for v in head.values()):
            raise PacketError("LG-FedAvg: non-finite head")
        reference = self.head or None
        if reference and any(head[k].shape != reference[k].shape for k in head):
            raise PacketError(
                f"LG-FedAvg: head of shape {head['weight'].shape}, the federation's is "
                f"{reference['weight'].shape}: the method needs one head shape for all clients"
            )
        reply.extras["head"] = head

    def absorb(self, server_round: int, replies: list[ClientReply]) -> dict[str, Any]:
        heads = [(r.metrics[p.NUM_EXAMPLES], r.extras["head"]) for r in replies]
        if not heads:
            return {}
        shapes = {h["weight"].shape for _, h in heads}
        if len(shapes) > 1:  # the first round: no reference yet to drop the odd ones against
            raise ValueError(
                f"LG-FedAvg needs one head shape for all clients, got {sorted(shapes)}; "
                "use a federation whose architectures share the head (or another strategy)"
            )
        weights = np.array([max(n, 0.0) for n, _ in heads], dtype=np.float64)
        weights = (
            weights / weights.sum() if weights.sum() > 0 else np.full(len(heads), 1 / len(heads))
        )
        self.head = {
            key: sum(
                w * h[key].astype(np.float64) for w, (_, h) in zip(weights, heads, strict=True)
            ).astype(np.float32)
            for key in ("weight", "bias")
        }
        return {"heads": len(heads)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "head": self.head}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.head = state["head"]
