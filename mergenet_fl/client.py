"""The three steps a client runs around local training, keyed by layer name.

1. :func:`install_merged` before training: ``W_new = W − A B + A' B'``, where ``(A, B)`` are
   exactly the target factors the adapter was given (or, without them, the client's own
   encoding of ``W``). An adapter that returns its input changes nothing, whatever round the
   factors it was given came from; the rest of ``W`` stays with the client.
2. Local training (the caller's own loop).
3. :func:`gradient_pieces` after training: with ``Δ = W_new − W_trained``, the pieces
   ``G_A = Δ B'ᵀ: (m, r)`` and ``G_B = A'ᵀ Δ: (r, n)`` let the server finish the
   hypernetwork's vector–Jacobian product. No full matrix leaves the client.

:func:`export_packet` encodes the (trained) transfer layers as a :class:`KnowledgePacket`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergenet_fl.lowrank import factorize
from mergenet_fl.packet import FactorPair, KnowledgePacket, LayerFactors, PacketError
from mergenet_fl.selection import SelectedLayer, get_matrix, set_matrix


def export_packet(
    model: nn.Module, layers: Sequence[SelectedLayer], rank: int, *, full: bool = False
) -> KnowledgePacket:
    """Rank-``rank`` factors of every selected layer of ``model``; with ``full``, each whole
    weight ``W: (m, n)`` as the exact factors ``(I_m, W)`` (the reference adapter's input)."""
    out = {}
    for layer in layers:
        w = get_matrix(model, layer)
        if full:
            a, b = torch.eye(w.shape[0]), w.detach().to(torch.float32).clone()
        else:
            a, b = factorize(w, rank)
        out[layer.name] = LayerFactors(a, b, layer.weight_shape, layer.kind, full)
    return KnowledgePacket(out)


@dataclass(frozen=True)
class InstalledLayer:
    """What :func:`gradient_pieces` needs of one installed layer."""

    installed: torch.Tensor  # W_new: (m, n), as written into the model (its dtype, read back)
    a: torch.Tensor  # A': (m, R)
    b: torch.Tensor  # B': (R, n)


def install_merged(
    model: nn.Module,
    layers: Sequence[SelectedLayer],
    merged: Mapping[str, FactorPair],
    rank: int,
    own: Mapping[str, FactorPair] | None = None,
) -> dict[str, InstalledLayer]:
    """Install merged factors ``{layer: (A': (m, R), B': (R, n))}`` in place.

    ``W_new = W + (A' B' − A B)`` with ``own[layer] = (A, B)``, the target factors the adapter
    was given; without ``own``, ``A B`` is the client's rank-``rank`` encoding of its current
    weight. Merged factors equal to ``own`` give back the weight unchanged, bit for bit. Layers
    missing from ``merged`` are left alone; names that are not selected layers, or ``own``
    factors missing for a merged layer, raise :class:`PacketError`.
    """
    by_name = {layer.name: layer for layer in layers}
    unknown = sorted(set(merged) - set(by_name))
    if unknown:
        raise PacketError(f"merged factors for layers that are not selected: {unknown}")
    if own is not None and set(own) != set(merged):
        raise PacketError(
            f"own factors for layers {sorted(own)} do not match merged ones {sorted(merged)}"
        )
    installed = {}
    for name, (a_new, b_new) in merged.items():
        layer = by_name[name]
        w = get_matrix(model, layer)
        a, b = own[name] if own is not None else factorize(w, rank)
        for what, (x, y) in (("merged", (a_new, b_new)), ("own", (a, b))):
            if x.shape[0] != w.shape[0] or y.shape[1] != w.shape[1] or x.shape[1] != y.shape[0]:
                raise PacketError(
                    f"{what} factors for {name!r}: A{tuple(x.shape)} B{tuple(y.shape)} "
                    f"do not fit a {w.shape[0]}x{w.shape[1]} matrix"
                )
        # The difference is exactly zero when the merged factors are the own ones.
        delta = a_new.to(w) @ b_new.to(w) - a.to(w) @ b.to(w)
        set_matrix(model, layer, w + delta)
        written = get_matrix(model, layer)  # a float16/bfloat16 model rounds what it keeps
        installed[name] = InstalledLayer(written, a_new.to(w), b_new.to(w))
    return installed


def gradient_pieces(
    model: nn.Module,
    layers: Sequence[SelectedLayer],
    installed: Mapping[str, InstalledLayer],
) -> dict[str, FactorPair]:
    """``{layer: (G_A = Δ B'ᵀ: (m, R), G_B = A'ᵀ Δ: (R, n))}`` with ``Δ = W_new − W_trained``."""
    by_name = {layer.name: layer for layer in layers}
    pieces = {}
    for name, inst in installed.items():
        delta = inst.installed - get_matrix(model, by_name[name]).detach().to(inst.installed)
        pieces[name] = (delta @ inst.b.T, inst.a.T @ delta)
    return pieces
