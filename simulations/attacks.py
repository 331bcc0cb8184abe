"""Well-formed poisoning replies, for the robustness study: a client group with ``attack:``
rewrites its train replies after honest training, as a malicious client would, so that every
check of the server still passes.

Kinds (``factor`` in brackets):

- ``scale_packet``: its knowledge packet's ``B`` factors scaled so that the larger factor norm
  is just under ``max_factor_norm`` (the server's refusal threshold);
- ``random_packet``: every packet array replaced by Gaussian noise of its shape and norm;
- ``flip_pieces``: its gradient pieces times ``−factor`` (1: a sign flip);
- ``scale_pieces``: its gradient pieces times ``factor``;
- ``replace_model``: what it uploads to be averaged replaced by Gaussian noise of ``factor``
  times its norm (model replacement): the parameters it shares with its group (``share=all``,
  GroupFedAvg), LG-FedAvg's head, FML's and FedKD's shared model, and the per-class means of
  FedProto, FedTGP, FedGH (prototypes) and FD (logits), whose counts stay as they were.

A client that claims another's identity is refused by the strategy's identity checks
(``tests/test_hostile.py``), so it is not a kind here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from mergenet_fl.flower import protocol as p

KINDS = ("scale_packet", "random_packet", "flip_pieces", "scale_pieces", "replace_model")
SCALED = ("flip_pieces", "scale_pieces", "replace_model")  # the kinds that use ``factor``
MARGIN = 0.99  # scale_packet: this share of max_factor_norm


@dataclass(frozen=True)
class Attack:
    """What an attacking client does to its train replies."""

    kind: str
    factor: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"attack kind {self.kind!r}; choose one of {KINDS}")
        if not self.factor > 0:
            raise ValueError(f"attack factor must be > 0, got {self.factor}")

    @property
    def label(self) -> str:
        """The kind, with its factor where it uses one: ``flip_pieces x10``."""
        return f"{self.kind} x{self.factor:g}" if self.kind in SCALED else self.kind

    def apply(self, reply: Message, max_factor_norm: float, seed: int) -> Message:
        """``reply`` (a train reply, changed in place) poisoned; replies without the record
        the kind rewrites pass unchanged."""
        rng = np.random.default_rng(seed)

        def replace(arrays: dict) -> dict:
            return _noise(arrays, rng, self.factor)

        def means(arrays: dict) -> dict:  # per-class means: their counts stay
            return arrays | _noise({"means": arrays["means"]}, rng, self.factor)

        rewrite: dict[str, dict[str, Callable[[dict], dict]]] = {
            "scale_packet": {p.PACKET: lambda a: _to_limit(a, max_factor_norm)},
            "random_packet": {p.PACKET: lambda a: _noise(a, rng, 1.0)},
            "flip_pieces": {p.PIECES: lambda a: {k: -self.factor * v for k, v in a.items()}},
            "scale_pieces": {p.PIECES: lambda a: {k: self.factor * v for k, v in a.items()}},
            "replace_model": {
                p.SHARED: replace,
                p.HEAD: replace,
                p.SHARED_MODEL: replace,
                p.PROTOS: means,
                p.LOGITS: means,
            },
        }
        records = reply.content.array_records
        for key, change in rewrite[self.kind].items():
            if key in records:
                records[key] = p.to_record(change(p.from_record(records[key])))
        return reply


def _to_limit(arrays: dict[str, np.ndarray], limit: float) -> dict[str, np.ndarray]:
    """Each layer's ``B`` scaled so that its larger factor norm is ``MARGIN · limit``."""
    out = dict(arrays)
    for key, b in arrays.items():
        if not key.endswith("/B"):
            continue
        a = arrays[key[: -len("B")] + "A"]
        target = MARGIN * limit
        norm_b = float(np.linalg.norm(b))
        if norm_b > 0 and float(np.linalg.norm(a)) < target:
            out[key] = (b * (target / norm_b)).astype(b.dtype)
    return out


def _noise(
    arrays: dict[str, np.ndarray], rng: np.random.Generator, scale: float
) -> dict[str, np.ndarray]:
    """Gaussian arrays of each array's shape and dtype, of ``scale`` times its norm."""
    out = {}
    for key, value in arrays.items():
        noise = rng.standard_normal(value.shape)
        norm = float(np.linalg.norm(noise))
        target = scale * float(np.linalg.norm(value))
        out[key] = (noise * (target / norm if norm > 0 else 0.0)).astype(value.dtype)
    return out
