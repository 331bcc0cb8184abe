"""FML (Shen et al., 2020) and FedKD (Wu et al., Nature Communications 2022): every client
trains a small shared model beside its own — one architecture for the whole federation — and
the server averages the shared model; the clients' own models never travel.

- FML: each client's own and shared model learn from the labels and from each other
  (deep mutual learning); the shared model travels whole and is averaged, example-weighted.
- FedKD: the shared model is a mentee distilled both ways with adaptive weights; it travels as
  truncated-SVD factors of each parameter matrix that keep a share ``T`` of the spectrum's
  energy, ``T`` rising from ``T_start`` to ``T_end`` over the run, both ways; the server
  averages the recovered matrices uniformly (as HtFLlib does) and compresses the average.

Their client side is :class:`~mergenet_fl.flower.extension.MutualLearning` and
:class:`~mergenet_fl.flower.extension.MentorMentee`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from mergenet_fl import PacketError
from mergenet_fl.flower import protocol as p
from mergenet_fl.flower.base import ClientReply, PeerStrategy


class FML(PeerStrategy):
    """Averages the shared model (its floating ``state_dict`` entries), example-weighted; a
    client whose shared model has other names or shapes is dropped, naming why."""

    method = "FML"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(share="none", **kwargs)
        self.shared: dict[str, np.ndarray] = {}  # the averaged shared model

    def encode(self, server_round: int) -> dict[str, np.ndarray]:
        """What travels down: the averaged shared model."""
        return self.shared

    def decode(self, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A reply's shared model as named arrays."""
        return record

    def weights(self, replies: list[ClientReply]) -> np.ndarray:
        """Each reply's weight in the average (sums to 1): by examples."""
        n = np.array([max(r.metrics[p.NUM_EXAMPLES], 0.0) for r in replies], dtype=np.float64)
        return n / n.sum() if n.sum() > 0 else np.full(len(replies), 1 / len(replies))

    def train_records(
        self, server_round: int, identities: dict[int, p.ClientIdentity]
    ) -> dict[int, dict[str, ArrayRecord]]:
        if not self.shared:
            return {}
        record = p.to_record(self.encode(server_round))
        return {nid: {p.SHARED_MODEL: record} for nid in identities}

    def validate(self, server_round: int, reply: ClientReply) -> None:
        if p.SHARED_MODEL not in reply.content.array_records:
            raise PacketError(f"{self.method}: the reply carries no shared model")
        state = self.decode(p.from_record(reply.content.array_records[p.SHARED_MODEL]))
        if not state or not all(np.isfinite(v).all() for v in state.values()):
            raise PacketError(f"{self.method}: empty or non-finite shared model")
        reference = self.shared or None
        if reference and {k: v.shape for k, v in state.items()} != {
            k: v.shape for k, v in reference.items()
        }:
            raise PacketError(
                f"{self.method}: the reply's shared model has other entries or shapes than the "
                "federation's: every client must build the same shared architecture"
            )
        reply.extras["shared"] = state

    def absorb(self, server_round: int, replies: list[ClientReply]) -> dict[str, Any]:
        if not replies:
            return {}
        states = [r.extras["shared"] for r in replies]
        layouts = {tuple((k, v.shape) for k, v in sorted(s.items())) for s in states}
        if len(layouts) > 1:  # the first round: no reference yet to drop the odd ones against
            raise ValueError(
                f"{self.method} needs one shared architecture for all clients, got "
                f"{len(layouts)} different ones"
            )
        weights = self.weights(replies)
        self.shared = {
            k: np.average(np.stack([s[k] for s in states]), axis=0, weights=weights).astype(
                np.float32
            )
            for k in states[0]
        }
        return {"shared_models": len(states)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "shared": self.shared}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.shared = state["shared"]


class FedKD(FML):
    """The mentee's average, sent as energy-truncated SVD factors (``T`` from ``t_start`` in
    round 1 to ``t_end`` at the last round); replies are compressed the same way."""

    method = "FedKD"

    def __init__(self, *, t_start: float = 0.95, t_end: float = 0.98, **kwargs: Any) -> None:
        if not 0.0 < t_start <= t_end <= 1.0:
            raise ValueError(f"FedKD needs 0 < t_start <= t_end <= 1, got {t_start}, {t_end}")
        super().__init__(**kwargs)
        self.t_start, self.t_end = t_start, t_end

    def energy(self, server_round: int) -> float:
        """HtFLlib's schedule: ``T_start`` in round 1, rising linearly towards ``T_end``."""
        progress = (server_round - 1) / max(self.last_round or 1, 1)
        return self.t_start + progress * (self.t_end - self.t_start)

    def train_config(self, server_round: int) -> dict[str, Any]:
        return {**super().train_config(server_round), p.ENERGY: self.energy(server_round)}

    def encode(self, server_round: int) -> dict[str, np.ndarray]:
        return p.compress_state(self.shared, self.energy(server_round))

    def decode(self, record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return p.recover_state(record)

    def weights(self, replies: list[ClientReply]) -> np.ndarray:
        return np.full(len(replies), 1 / len(replies))
