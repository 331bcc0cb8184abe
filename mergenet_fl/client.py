"""The three steps a client runs around local training, keyed by layer name.

1. :func:`install_merged` before training: ``W_new = W − A B + A' B'``. Only the low-rank part
   is replaced; the residual ``W − A B`` stays with the client.
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


def export_packet(model: nn.Module, layers: Sequence[SelectedLayer], rank: int) -> KnowledgePacket:
    """Rank-``rank`` factors of every selected layer of ``model``."""
    out = {}
    for layer in layers:
        a, b = factorize(get_matrix(model, layer), rank)
        out[layer.name] = LayerFactors(a, b, layer.weight_shape, layer.kind)
    return KnowledgePacket(out)


@dataclass(frozen=True)
class InstalledLayer:
    """What :func:`gradient_pieces` needs of one installed layer."""

    installed: torch.Tensor  # W_new: (m, n)
    a: torch.Tensor  # A': (m, R)
    b: torch.Tensor  # B': (R, n)


def install_merged(
    model: nn.Module,
    layers: Sequence[SelectedLayer],
    merged: Mapping[str, FactorPair],
    rank: int,
) -> dict[str, InstalledLayer]:
    """Install merged factors ``{layer: (A': (m, R), B': (R, n))}`` in place.

    ``A B`` is the client's own rank-``rank`` encoding of its current weight, so merged factors
    equal to the client's own give back the weight unchanged. Layers missing from ``merged``
    are left alone; names that are not selected layers raise :class:`PacketError`.
    """
    by_name = {layer.name: layer for layer in layers}
    unknown = sorted(set(merged) - set(by_name))
    if unknown:
        raise PacketError(f"merged factors for layers that are not selected: {unknown}")
    installed = {}
    for name, (a_new, b_new) in merged.items():
        layer = by_name[name]
        w = get_matrix(model, layer)
        a, b = factorize(w, rank)
        if a_new.shape[0] != w.shape[0] or b_new.shape[1] != w.shape[1]:
            raise PacketError(
                f"merged factors for {name!r}: A'{tuple(a_new.shape)} B'{tuple(b_new.shape)} "
                f"do not fit a {w.shape[0]}x{w.shape[1]} matrix"
            )
        # The difference is exactly zero when the merged factors are the client's own.
        w_new = w + (a_new @ b_new - a @ b)
        set_matrix(model, layer, w_new)
        installed[name] = InstalledLayer(w_new, a_new, b_new)
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
        delta = inst.installed - get_matrix(model, by_name[name])
        pieces[name] = (delta @ inst.b.T, inst.a.T @ delta)
    return pieces
