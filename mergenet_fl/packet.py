"""Knowledge packets: the low-rank factors a client shares, and their flat wire form.

Every tensor travels under a name, ``"<layer>/A"`` and ``"<layer>/B"``, never by position.
The same layout carries the three things that cross the wire:

- a :class:`KnowledgePacket` (client -> server): factors plus a manifest of shapes and kinds;
- merged factors ``(A', B')`` (server -> client);
- hypernetwork gradient pieces ``(G_A, G_B)`` (client -> server).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from mergenet_fl.selection import SUPPORTED_KINDS

FORMAT_VERSION = 1
ALLOWED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))

FactorPair = tuple[torch.Tensor, torch.Tensor]
"""``(A: (m, r), B: (r, n))``, or gradient pieces ``(G_A: (m, r), G_B: (r, n))``."""


class PacketError(ValueError):
    """A packet, merged factors or gradient pieces failed validation."""


ENCODINGS = ("lowrank", "full")


@dataclass(frozen=True)
class LayerFactors:
    """Rank-r factors of one layer: ``A: (m, r)``, ``B: (r, n)``, and the weight they encode.

    ``full``: the layer travels as its whole weight, as the exact factors ``(I_m, W)`` (the
    reference adapter's encoding: ``r = m``, nothing truncated).
    """

    a: torch.Tensor
    b: torch.Tensor
    weight_shape: tuple[int, ...]
    kind: str
    full: bool = False

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.a.shape[0], self.b.shape[1]

    @property
    def rank(self) -> int:
        return self.a.shape[1]


@dataclass(frozen=True)
class KnowledgePacket:
    """The latest factors of one client's transfer layers, keyed by layer name."""

    layers: Mapping[str, LayerFactors]

    def factors(self) -> dict[str, FactorPair]:
        return {name: (lf.a, lf.b) for name, lf in self.layers.items()}

    def matrix_shapes(self) -> dict[str, tuple[int, int]]:
        return {name: lf.matrix_shape for name, lf in self.layers.items()}

    def signature(self) -> tuple[tuple[str, tuple[int, ...], str, str], ...]:
        """What must match between clients of one architecture group."""
        return tuple(
            (n, lf.weight_shape, lf.kind, ENCODINGS[lf.full])
            for n, lf in sorted(self.layers.items())
        )

    def num_values(self) -> int:
        return sum(lf.a.numel() + lf.b.numel() for lf in self.layers.values())

    def to_wire(self, dtype: np.dtype = np.float32) -> tuple[dict[str, np.ndarray], str]:
        """Flat arrays and a JSON manifest."""
        manifest = {
            "version": FORMAT_VERSION,
            "layers": {
                name: {
                    "shape": list(lf.weight_shape),
                    "kind": lf.kind,
                    "rank": lf.rank,
                    "encoding": ENCODINGS[lf.full],
                }
                for name, lf in self.layers.items()
            },
        }
        return encode_factors(self.factors(), dtype), json.dumps(manifest, sort_keys=True)

    @classmethod
    def from_wire(
        cls,
        arrays: Mapping[str, np.ndarray],
        manifest: str,
        *,
        max_rank: int,
        max_values: int | None = None,
    ) -> KnowledgePacket:
        """Decode and validate; raise :class:`PacketError` naming the layer and the problem.

        A ``full`` layer's rank is its row count ``m`` (its ``A`` must be exactly ``I_m``).
        """
        layers_meta = _parse_manifest(manifest)
        shapes: dict[str, tuple[int, int]] = {}
        for name, meta in layers_meta.items():
            weight_shape = tuple(meta["shape"])
            shapes[name] = (weight_shape[0], int(np.prod(weight_shape[1:])))
        factors = decode_factors(
            arrays, shapes, max_rank=max_rank, max_values=max_values, what="packet"
        )
        layers = {}
        for name, (a, b) in factors.items():
            meta = layers_meta[name]
            full = _is_full(meta)
            if meta["rank"] != a.shape[1]:
                raise PacketError(
                    f"packet layer {name!r}: manifest says rank {meta['rank']}, "
                    f"factors have rank {a.shape[1]}"
                )
            if full and not torch.equal(a, torch.eye(a.shape[0])):
                raise PacketError(f"packet layer {name!r}: a full weight's A is not the identity")
            layers[name] = LayerFactors(a, b, tuple(meta["shape"]), meta["kind"], full)
        return cls(layers)


def _parse_manifest(manifest: str) -> dict[str, dict]:
    try:
        data = json.loads(manifest)
    except (TypeError, json.JSONDecodeError) as exc:
        raise PacketError(f"packet manifest is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        raise PacketError(f"packet manifest has no version {FORMAT_VERSION} (got {data!r:.80})")
    layers = data.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise PacketError("packet manifest lists no layers")
    for name, meta in layers.items():
        if not isinstance(meta, dict):
            raise PacketError(f"packet layer {name!r}: manifest entry is not a table")
        shape, kind, rank = meta.get("shape"), meta.get("kind"), meta.get("rank")
        if (
            not isinstance(shape, list)
            or len(shape) not in (2, 4)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise PacketError(f"packet layer {name!r}: bad weight shape {shape!r}")
        if kind not in SUPPORTED_KINDS or (kind == "linear") != (len(shape) == 2):
            raise PacketError(f"packet layer {name!r}: kind {kind!r} does not fit shape {shape}")
        if not isinstance(rank, int) or isinstance(rank, bool):
            raise PacketError(f"packet layer {name!r}: rank {rank!r} is not an integer")
        if meta.get("encoding", "lowrank") not in ENCODINGS:
            raise PacketError(
                f"packet layer {name!r}: encoding {meta.get('encoding')!r}; one of {ENCODINGS}"
            )
    return layers


def _is_full(meta: dict) -> bool:
    return meta.get("encoding", "lowrank") == "full"


def encode_factors(
    factors: Mapping[str, FactorPair], dtype: np.dtype = np.float32
) -> dict[str, np.ndarray]:
    """``{layer: (A, B)}`` -> ``{"layer/A": ndarray, "layer/B": ndarray}``."""
    arrays = {}
    for name, (a, b) in factors.items():
        arrays[f"{name}/A"] = a.detach().cpu().numpy().astype(dtype, copy=False)
        arrays[f"{name}/B"] = b.detach().cpu().numpy().astype(dtype, copy=False)
    return arrays


def decode_factors(
    arrays: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, int]],
    *,
    max_rank: int,
    max_values: int | None = None,
    what: str = "factors",
) -> dict[str, FactorPair]:
    """Validate flat arrays against the expected matrix shapes and return float32 tensors.

    Checks, each raising :class:`PacketError` naming the layer: exactly the keys
    ``"<layer>/A"``, ``"<layer>/B"`` for ``shapes``; ``A: (m, r)``, ``B: (r, n)`` with
    ``1 <= r <= max_rank``; dtype float32 or float16; finite values; at most ``max_values``
    numbers in all.
    """
    expected = {f"{n}/{f}" for n in shapes for f in ("A", "B")}
    missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
    if missing or extra:
        raise PacketError(f"{what}: missing keys {missing[:6]}, unexpected keys {extra[:6]}")
    total = sum(int(np.asarray(arrays[k]).size) for k in expected)
    if max_values is not None and total > max_values:
        raise PacketError(f"{what}: {total} values exceed the limit of {max_values}")
    out: dict[str, FactorPair] = {}
    for name, (m, n) in shapes.items():
        a, b = np.asarray(arrays[f"{name}/A"]), np.asarray(arrays[f"{name}/B"])
        for key, arr in (("A", a), ("B", b)):
            if arr.dtype not in ALLOWED_DTYPES:
                raise PacketError(
                    f"{what} layer {name!r}: {key} has dtype {arr.dtype}, "
                    "expected float32 or float16"
                )
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != m or b.shape[1] != n:
            raise PacketError(
                f"{what} layer {name!r}: A{a.shape} B{b.shape} do not fit a {m}x{n} matrix"
            )
        r = a.shape[1]
        if b.shape[0] != r:
            raise PacketError(f"{what} layer {name!r}: A has rank {r}, B has rank {b.shape[0]}")
        if not 1 <= r <= max_rank:
            raise PacketError(f"{what} layer {name!r}: rank {r} outside [1, {max_rank}]")
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise PacketError(f"{what} layer {name!r}: non-finite values")
        out[name] = (
            torch.from_numpy(a.astype(np.float32, copy=True)),
            torch.from_numpy(b.astype(np.float32, copy=True)),
        )
    return out
