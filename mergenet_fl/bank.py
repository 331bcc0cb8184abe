"""The knowledge bank: the latest packet of every client, and architecture-group summaries."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mergenet_fl.lowrank import align_signs, factorize_product
from mergenet_fl.packet import KnowledgePacket, LayerFactors, PacketError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BankEntry:
    """A client's latest packet, its architecture group and the round it came from.

    ``send_only`` peers (e.g. a frozen pre-trained model) are sources and never targets.
    """

    packet: KnowledgePacket
    group: str
    round: int
    send_only: bool = False


class KnowledgeBank:
    """Latest :class:`BankEntry` per client id; all members of a group share one signature."""

    def __init__(self) -> None:
        self._entries: dict[str, BankEntry] = {}
        self._summaries: dict[str, KnowledgePacket] = {}  # the last summary of each group

    def __contains__(self, client_id: str) -> bool:
        return client_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def get(self, client_id: str) -> BankEntry:
        return self._entries[client_id]

    def check(self, client_id: str, packet: KnowledgePacket, group: str) -> None:
        """Raise :class:`PacketError` if ``packet`` does not fit the other members of ``group``."""
        for cid, entry in self._entries.items():
            if cid != client_id and entry.group == group:
                if entry.packet.signature() != packet.signature():
                    raise PacketError(
                        f"client {client_id!r}: packet layers {packet.signature()} differ from "
                        f"those of group {group!r} ({entry.packet.signature()})"
                    )
                return

    def put(
        self,
        client_id: str,
        packet: KnowledgePacket,
        *,
        group: str,
        round: int,
        send_only: bool = False,
    ) -> None:
        """Store ``packet`` as ``client_id``'s latest (after :meth:`check`), its singular pairs
        signed like that client's previous packet (:func:`~mergenet_fl.lowrank.align_signs`)."""
        self.check(client_id, packet, group)
        if client_id in self._entries:
            packet = _aligned(packet, self._entries[client_id].packet)
        self._entries[client_id] = BankEntry(packet, group, round, send_only)

    def groups(self) -> dict[str, list[str]]:
        """Group name -> sorted member ids."""
        out: dict[str, list[str]] = {}
        for cid in sorted(self._entries):
            out.setdefault(self._entries[cid].group, []).append(cid)
        return out

    def forget_older_than(self, current_round: int, max_age: int) -> list[str]:
        """Drop packets more than ``max_age`` rounds old; return the forgotten client ids."""
        old = [c for c, e in self._entries.items() if current_round - e.round > max_age]
        for cid in old:
            del self._entries[cid]
        if old:
            log.info("knowledge bank forgot %d stale packets: %s", len(old), old)
        return old

    def summary(self, group: str, rank: int) -> KnowledgePacket:
        """One packet standing for ``group``: each layer's mean reconstructed weight, re-encoded.

        ``mean_i A_i B_i`` is the product of the stacked factors,
        ``[A_1 … A_N] @ [B_1; …; B_N] / N``, re-encoded by :func:`factorize_product` without
        forming it. Singular pairs are signed like the group's previous summary. A layer that
        travels whole (``full``) keeps its mean weight whole, ``(I, mean_i W_i)``.
        """
        members = [self._entries[c].packet for c in self.groups()[group]]
        layers = {}
        for name, first in members[0].layers.items():
            if first.full:  # whole weights ``(I, W)``: their mean, kept whole
                mean = torch.stack([p.layers[name].b for p in members]).mean(0)
                layers[name] = LayerFactors(first.a, mean, first.weight_shape, first.kind, True)
                continue
            a = torch.cat([p.layers[name].a for p in members], dim=1)
            b = torch.cat([p.layers[name].b for p in members], dim=0)
            fa, fb = factorize_product(a, b / len(members), rank)
            layers[name] = LayerFactors(fa, fb, first.weight_shape, first.kind)
        summary = KnowledgePacket(layers)
        if group in self._summaries:
            summary = _aligned(summary, self._summaries[group])
        self._summaries[group] = summary
        return summary

    def state_dict(self) -> dict:
        return {
            "entries": {
                cid: {"group": e.group, "round": e.round, "send_only": e.send_only}
                | {"layers": _layers_state(e.packet)}
                for cid, e in self._entries.items()
            },
            "summaries": {g: _layers_state(p) for g, p in self._summaries.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self._entries = {
            cid: BankEntry(_layers_packet(e["layers"]), e["group"], e["round"], e["send_only"])
            for cid, e in state["entries"].items()
        }
        self._summaries = {g: _layers_packet(s) for g, s in state["summaries"].items()}


def _aligned(packet: KnowledgePacket, previous: KnowledgePacket) -> KnowledgePacket:
    """``packet`` with each layer's singular pairs signed like ``previous``'s (same layer)."""
    layers = {}
    for name, lf in packet.layers.items():
        before = previous.layers.get(name)
        if before is not None and before.a.shape[0] == lf.a.shape[0] and not lf.full:
            a, b = align_signs(lf.a, lf.b, before.a)
            lf = LayerFactors(a, b, lf.weight_shape, lf.kind, lf.full)
        layers[name] = lf
    return KnowledgePacket(layers)


def _layers_state(packet: KnowledgePacket) -> dict:
    return {
        n: {
            "a": lf.a,
            "b": lf.b,
            "weight_shape": list(lf.weight_shape),
            "kind": lf.kind,
            "full": lf.full,
        }
        for n, lf in packet.layers.items()
    }


def _layers_packet(state: dict) -> KnowledgePacket:
    return KnowledgePacket(
        {
            n: LayerFactors(
                lf["a"], lf["b"], tuple(lf["weight_shape"]), lf["kind"], lf.get("full", False)
            )
            for n, lf in state.items()
        }
    )
