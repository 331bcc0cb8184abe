"""MergeNet as a Flower strategy: every client is a peer, the LPKA adapter lives on the server.

Rounds follow the knowledge-transfer cycle: round ``r`` is a transfer round when
``r > 1`` and ``(r - 1) % transfer_every == 0``; the other rounds are self-learning only.
In the round before a transfer round clients send their knowledge packets; in a transfer
round each node gets its own merged factors, installs them, trains, and answers with the
gradient pieces that update the adapter.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from mergenet_fl import (
    Generation,
    HypernetConfig,
    Hypernetwork,
    KnowledgeBank,
    KnowledgePacket,
    PacketError,
    decode_factors,
    encode_factors,
)
from mergenet_fl.flower import protocol as p
from mergenet_fl.flower.base import ClientReply, PeerStrategy
from mergenet_fl.lowrank import product_norm
from mergenet_fl.robust import above_median, against_median

log = logging.getLogger(__name__)


def _pieces_norm(pieces: dict) -> float:
    """The norm of one client's gradient pieces (layer -> (G_A, G_B))."""
    return sum(float(t.double().pow(2).sum()) for pair in pieces.values() for t in pair) ** 0.5


class MergeNet(PeerStrategy):
    """Knowledge transfer across heterogeneous clients through a server-side LPKA adapter.

    Parameters
    ----------
    hypernet:
        The adapter, its optimiser and how sources and targets are formed. Default:
        :class:`~mergenet_fl.HypernetConfig` with ``group_targets`` on when ``share`` is.
    transfer_every:
        Rounds per knowledge-transfer cycle (``T_cyc``); self-learning in between.
    max_packet_values:
        Largest packet (in numbers) accepted from a client.
    max_packet_age:
        Forget packets older than this many rounds (``None``: keep each client's last).
    max_factor_norm:
        A packet with a factor of larger Frobenius norm is refused (a weight of that size is
        an attack or a diverged model, and would poison its group's summary).
    clip_pieces:
        A client's gradient pieces are scaled down to at most this total norm (``None``: off).
    screen:
        Screening against the others of a round (``None``: off). A packet is not stored when
        a layer's weight norm exceeds ``screen`` times the median of its group's (the bank's
        and this round's packets), or points away from the coordinate-wise median of the
        others' weights (cosine below −0.5; at most 16 others); a client's gradient
        pieces are scaled down to ``screen`` times the round's median norm. Each needs 3
        clients to compare.
    **kwargs:
        :class:`~mergenet_fl.flower.base.PeerStrategy` options (``share``, sampling, ``on_round``).
    """

    def __init__(
        self,
        *,
        hypernet: HypernetConfig | None = None,
        transfer_every: int = 1,
        max_packet_values: int = 50_000_000,
        max_packet_age: int | None = None,
        max_factor_norm: float = 1e4,
        clip_pieces: float | None = 100.0,
        screen: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not max_factor_norm > 0:
            raise ValueError(f"max_factor_norm must be > 0, got {max_factor_norm}")
        if clip_pieces is not None and not clip_pieces > 0:
            raise ValueError(f"clip_pieces must be > 0 or None, got {clip_pieces}")
        if screen is not None and not screen >= 1:
            raise ValueError(f"screen must be >= 1 or None, got {screen}")
        if transfer_every < 1:
            raise ValueError(f"transfer_every must be >= 1, got {transfer_every}")
        if max_packet_age is not None and max_packet_age < 0:
            raise ValueError(f"max_packet_age must be >= 0 or None, got {max_packet_age}")
        if hypernet is None:
            hypernet = HypernetConfig(group_targets=self.share != "none")
        self.hypernet = Hypernetwork(hypernet)
        self.transfer_every = transfer_every
        self.max_packet_values = max_packet_values
        self.max_packet_age = max_packet_age
        self.max_factor_norm = max_factor_norm
        self.clip_pieces = clip_pieces
        self.screen = screen
        self.bank = KnowledgeBank()
        self.generation: Generation | None = None

    def is_transfer_round(self, server_round: int) -> bool:
        return server_round > 1 and (server_round - 1) % self.transfer_every == 0

    def summary(self) -> None:
        super().summary()
        cfg = self.hypernet.cfg
        log.info(
            "\t└──> MergeNet: adapter %s (rank %d, dim %d, heads %d, layers %d), transfer every "
            "%d rounds, %s %s, lr %g",
            cfg.adapter.variant,
            cfg.adapter.rank,
            cfg.adapter.dim,
            cfg.adapter.heads,
            cfg.adapter.layers,
            self.transfer_every,
            cfg.optimizer,
            "group summaries" if cfg.summarize_groups else "per-client sources",
            cfg.lr,
        )

    def train_config(self, server_round: int) -> dict[str, Any]:
        return {
            p.SEND_PACKET: self.is_transfer_round(server_round + 1),
            p.ADAPTER_RANK: self.hypernet.rank,
            p.FULL_WEIGHTS: self.hypernet.full,
        }

    def train_records(
        self, server_round: int, identities: dict[int, p.ClientIdentity]
    ) -> dict[int, dict[str, ArrayRecord]]:
        self.generation = None
        if not self.is_transfer_round(server_round):
            return {}
        targets = [i.client_id for i in identities.values() if not i.send_only]
        merged, self.generation = self.hypernet.generate(self.bank, targets, server_round)
        own = self.generation.inputs()
        log.info(
            "round %d: merged factors for %d of %d sampled clients",
            server_round,
            len(merged),
            len(identities),
        )
        return {
            nid: {
                p.MERGED: p.to_record(encode_factors(merged[ident.client_id])),
                p.OWN: p.to_record(encode_factors(own[ident.client_id])),
            }
            for nid, ident in identities.items()
            if ident.client_id in merged
        }

    def while_waiting(self) -> None:
        if self.generation is not None:  # the diagnostics, off the round's critical path
            self.generation.measure()

    def validate(self, server_round: int, reply: ClientReply) -> None:
        cid, records = reply.identity.client_id, reply.content.array_records
        if p.PACKET in records:
            packet = KnowledgePacket.from_wire(
                p.from_record(records[p.PACKET]),
                reply.manifest,
                max_rank=self.hypernet.rank,
                max_values=self.max_packet_values,
            )
            for layer, lf in packet.layers.items():
                if lf.full != self.hypernet.full:
                    want = "whole weights" if self.hypernet.full else "low-rank factors"
                    raise PacketError(
                        f"packet layer {layer!r}: {'a whole weight' if lf.full else 'low-rank'} "
                        f"factors, but this server's adapter "
                        f"({self.hypernet.cfg.adapter.variant}) takes {want}"
                    )
                norm = max(float(lf.a.double().norm()), float(lf.b.double().norm()))
                if norm > self.max_factor_norm:
                    raise PacketError(
                        f"packet layer {layer!r}: factor norm {norm:.3g} exceeds "
                        f"{self.max_factor_norm:.3g}"
                    )
            self.bank.check(cid, packet, reply.identity.group)
            reply.extras["packet"] = packet
        sent = self.generation.targets().get(cid) if self.generation else None
        if sent and p.PIECES not in records:
            raise PacketError("got merged factors but sent no gradient pieces")
        if p.PIECES in records:
            if not sent:
                raise PacketError("sent gradient pieces without having merged factors")
            pieces = decode_factors(
                p.from_record(records[p.PIECES]),
                {layer: (m, n) for layer, (m, _, n) in sent.items()},
                max_rank=self.hypernet.rank,
                what="gradient pieces",
            )
            self.generation.check_pieces(cid, pieces)
            reply.extras["pieces"] = self._clip(cid, pieces)

    def _clip(self, client_id: str, pieces: dict) -> dict:
        """Scale a client's pieces down to a total norm of at most ``clip_pieces``."""
        norm = _pieces_norm(pieces)
        if self.clip_pieces is None or norm <= self.clip_pieces:
            return pieces
        log.info("client %r: gradient pieces of norm %.3g clipped", client_id, norm)
        scale = self.clip_pieces / norm
        return {layer: (ga * scale, gb * scale) for layer, (ga, gb) in pieces.items()}

    def absorb(self, server_round: int, replies: list[ClientReply]) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        if self.generation is not None and self.generation.diagnostics:
            # Who learns from whom: measured on the factors this round's clients were sent.
            stats["targets"] = self.generation.diagnostics
            stats["lambda"] = self.hypernet.adapter.mixtures()
            effects = [d["transfer_effect"] for t in stats["targets"].values() for d in t.values()]
            log.info(
                "round %d: transfer_effect mean %.3g, max %.3g over %d target layers",
                server_round,
                sum(effects) / len(effects),
                max(effects),
                len(effects),
            )
        pieces = {r.identity.client_id: r.extras["pieces"] for r in replies if "pieces" in r.extras}
        if self.screen is not None and pieces:
            pieces, stats["screened_pieces"] = self._screen_pieces(pieces)
        if self.generation is not None and pieces:
            # each client's share of the norm of what enters the adapter's step (influence)
            norms = {c: _pieces_norm(ps) for c, ps in pieces.items()}
            total = sum(norms.values())
            stats["piece_shares"] = {c: n / total if total > 0 else 0.0 for c, n in norms.items()}
            stats.update(self.hypernet.update(self.generation, pieces))
            log.info(
                "round %d: adapter step from %d clients (gradient norm %.3g)",
                server_round,
                len(pieces),
                stats["grad_norm"],
            )
        arrived = {r.identity.client_id: r for r in replies if "packet" in r.extras}
        for reply in replies:
            if "packet" not in reply.extras:
                continue
            if self.screen is not None:
                reason = self._screened(reply, arrived)
                if reason is not None:
                    log.warning(
                        "round %d: packet of %r screened out: %s",
                        server_round,
                        reply.identity.client_id,
                        reason,
                    )
                    stats.setdefault("screened_packets", []).append(reply.identity.client_id)
                    continue
            try:  # two new members of one group may disagree within the same round
                self.bank.put(
                    reply.identity.client_id,
                    reply.extras["packet"],
                    group=reply.identity.group,
                    round=server_round,
                    send_only=reply.identity.send_only,
                )
            except PacketError as exc:
                log.warning(
                    "round %d: packet of %r not stored: %s",
                    server_round,
                    reply.identity.client_id,
                    exc,
                )
        if self.max_packet_age is not None:
            self.bank.forget_older_than(server_round, self.max_packet_age)
        self.generation = None
        return {**stats, "bank": len(self.bank), "transfer": self.is_transfer_round(server_round)}

    def _screen_pieces(self, pieces: dict) -> tuple[dict, list[str]]:
        """Each client's pieces scaled down to ``screen`` times the round's median norm; the
        ids of those scaled."""
        ids = sorted(pieces)
        norms = [_pieces_norm(pieces[c]) for c in ids]
        flagged = above_median(norms, self.screen)
        limit = self.screen * float(np.median(norms))
        out = dict(pieces)
        for cid, norm, flag in zip(ids, norms, flagged, strict=True):
            if flag:
                out[cid] = {
                    k: (ga * limit / norm, gb * limit / norm) for k, (ga, gb) in pieces[cid].items()
                }
        return out, [c for c, f in zip(ids, flagged, strict=True) if f]

    def _screened(self, reply: ClientReply, arrived: dict[str, ClientReply]) -> str | None:
        """Why ``reply``'s packet is screened out against its group's (None: it is not)."""
        cid, group = reply.identity.client_id, reply.identity.group
        latest = {c: self.bank.get(c).packet for c in self.bank if self.bank.get(c).group == group}
        latest |= {c: r.extras["packet"] for c, r in arrived.items() if r.identity.group == group}
        others = [latest[c] for c in sorted(latest, reverse=True) if c != cid][:16]
        packet = reply.extras["packet"]
        for layer, lf in packet.layers.items():
            peers = [o.layers[layer] for o in others if layer in o.layers]
            norms = [float(product_norm(lf.a, lf.b))] + [
                float(product_norm(o.a, o.b)) for o in peers
            ]
            if above_median(norms, self.screen)[0]:
                return (
                    f"layer {layer!r}: norm {norms[0]:.3g} above {self.screen:g} x the group's "
                    f"median {float(np.median(norms)):.3g}"
                )
            rows = [(lf.a @ lf.b).numpy()] + [(o.a @ o.b).numpy() for o in peers]
            cosine = against_median(rows)[0]
            if cosine < -0.5:  # unrelated weights (other inits) sit near 0: not an attack
                return f"layer {layer!r}: points away from the group's median (cosine {cosine:.2f})"
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "hypernet": self.hypernet.state_dict(),
            "bank": self.bank.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.hypernet = Hypernetwork(self.hypernet.cfg)
        self.hypernet.load_state_dict(state["hypernet"])
        self.bank.load_state_dict(state["bank"])
