"""The reference code's adapter on whole weights (``variant="reference"``).

What Fantasylii/mergenet's ``model/param_attention.py`` does in its ResNet-50 → MobileNetV2
script (``../shared/docs/mergenet.md`` §7), for any number of sources:

- the target's weight ``W: (m, n)`` is read as ``m`` row tokens of width ``n`` and as ``n``
  column tokens of width ``m``; each source weight ``S: (m_s, n_s)`` likewise;
- four cross-attentions (target rows or columns attending to source rows or columns), each
  post-norm, ``LayerNorm(query + out(attention(query, source)))``, with 8 heads and an inner
  width computed from the shapes, ``(w_query + w_key) / 2`` rounded down to the heads; the
  four outputs (per source, for several sources) are averaged;
- a post-norm feed-forward on the row tokens, ``LayerNorm(x + lin₂(drop(gelu(lin₁ x))))``,
  ``n → 2n → n`` with spectral norm on both linear maps;
- two such layers; dropout stays on when it generates (the reference keeps the adapter in
  train mode).

Its output overwrites the target's weight: the layer must be followed by a normalisation that
absorbs the scale of layer-normalised rows (as the reference's 1×1 convolution before
BatchNorm is). In the federation the weights travel as the exact factors ``(I_m, W)``
(:attr:`mergenet_fl.LayerFactors.full`), and the adapter returns ``(I_m, W')``, so that the
client's install ``W + A'B' − AB`` writes ``W'`` and its gradient piece ``G_B`` is ``Δ``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from mergenet_fl.adapter import READINGS, AdapterConfig, read

Shape = tuple[int, int]


@dataclass(frozen=True)
class WeightSources:
    """The whole source weights of one target: ``weights[i]: (m_i, n_i)``."""

    weights: tuple[torch.Tensor, ...]

    @classmethod
    def build(cls, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> WeightSources:
        """From source factors ``[(A_s: (m_s, r), B_s: (r, n_s)), ...]`` (at least one)."""
        if not factors:
            raise ValueError("a target needs at least one source layer")
        return cls(tuple(a @ b for a, b in factors))

    @property
    def shapes(self) -> tuple[Shape, ...]:
        return tuple(dict.fromkeys((w.shape[0], w.shape[1]) for w in self.weights))

    def to(self, device: torch.device | str) -> WeightSources:
        return WeightSources(tuple(w.to(device) for w in self.weights))


def attention_width(query: int, key: int, heads: int) -> int:
    """The reference's inner width: the mean of the token widths, rounded down to the heads."""
    return max(heads, (query + key) // 2 // heads * heads)


class CrossAttention(nn.Module):
    """``LayerNorm(query + out(MHA(q(query), k(key), v(key))))`` for tokens of width ``query``
    attending to tokens of width ``key``."""

    def __init__(self, query: int, key: int, heads: int, dropout: float) -> None:
        super().__init__()
        width = attention_width(query, key, heads)
        self.heads, self.dropout = heads, dropout
        self.q, self.o = nn.Linear(query, width), nn.Linear(width, query)
        self.k, self.v = nn.Linear(key, width), nn.Linear(key, width)
        self.norm = nn.LayerNorm(query)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """``query: (N, Lq, wq)``, ``key: (Lk, wk)`` -> ``(N, Lq, wq)``."""
        n, lq, _ = query.shape
        h = self.heads
        q = self.q(query).reshape(n, lq, h, -1).transpose(1, 2)
        k = self.k(key).reshape(1, key.shape[0], h, -1).transpose(1, 2).expand(n, -1, -1, -1)
        v = self.v(key).reshape(1, key.shape[0], h, -1).transpose(1, 2).expand(n, -1, -1, -1)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.norm(query + self.o(out.transpose(1, 2).reshape(n, lq, -1)))


class FeedForward(nn.Module):
    """``LayerNorm(x + lin₂(drop(gelu(lin₁ x))))`` on tokens of width ``width``, hidden
    ``2·width``, spectral norm on both maps."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.up = spectral_norm(nn.Linear(width, 2 * width))
        self.down = spectral_norm(nn.Linear(2 * width, width))
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.down(self.drop(F.gelu(self.up(x)))))


class ReferenceAdapter(nn.Module):
    """The reference adapter, with the interface of :class:`~mergenet_fl.LPKA`: modules are
    created for every (target shape, source shape) pair registered
    (:meth:`register_shapes`), deterministically seeded by their name."""

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        if not cfg.full:
            raise ValueError(f"ReferenceAdapter needs variant='reference', got {cfg.variant!r}")
        self.cfg = cfg
        self.attention = nn.ModuleList(nn.ModuleDict() for _ in range(cfg.layers))
        self.ffn = nn.ModuleList(nn.ModuleDict() for _ in range(cfg.layers))
        self.registered: list[tuple[Shape, Shape]] = []

    @staticmethod
    def _key(qr: str, kr: str, query: int, key: int) -> str:
        return f"{qr}_{kr}_{query}_{key}"

    def register_shapes(self, pairs: Iterable[tuple[Shape, Shape]]) -> list[nn.Parameter]:
        """Create the modules a target of shape ``(m, n)`` needs to attend to a source of shape
        ``(m_s, n_s)``, for each ``((m, n), (m_s, n_s))``; return the new parameters."""
        new: list[nn.Parameter] = []
        for target, source in pairs:
            pair = ((int(target[0]), int(target[1])), (int(source[0]), int(source[1])))
            if pair in self.registered:
                continue
            self.registered.append(pair)
            (m, n), (ms, ns) = pair
            widths = {"rows": (n, ns), "cols": (m, ms)}
            for i in range(self.cfg.layers):
                for qr in READINGS:
                    for kr in READINGS:
                        query, key = widths[qr][0], widths[kr][1]
                        name = self._key(qr, kr, query, key)
                        if name not in self.attention[i]:
                            self.attention[i][name] = self._seeded(
                                f"{i}.{name}",
                                CrossAttention,
                                query,
                                key,
                                self.cfg.heads,
                                self.cfg.dropout,
                            )
                            new += list(self.attention[i][name].parameters())
                if str(n) not in self.ffn[i]:
                    self.ffn[i][str(n)] = self._seeded(
                        f"{i}.ffn.{n}", FeedForward, n, self.cfg.ffn_dropout
                    )
                    new += list(self.ffn[i][str(n)].parameters())
        return new

    def _seeded(self, path: str, module: type[nn.Module], *args: object) -> nn.Module:
        """``module(*args)`` initialised from a seed of the adapter's seed and ``path``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"{self.cfg.seed}:reference.{path}".encode()))
            return module(*args)

    def forward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        sources: WeightSources,
        memo: object | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Generated weights for a batch of targets that share ``sources``, as factors.

        ``a: (N, m, r)``, ``b: (N, r, n)`` (any exact factors of the targets' weights) ->
        ``(I_m: (N, m, m), W': (N, m, n))``; only ``W'`` depends on the adapter. ``memo`` is
        accepted for the interface and not used.
        """
        x = a @ b
        n_targets, m, n = x.shape
        for attention, ffn in zip(self.attention, self.ffn, strict=True):
            parts = []
            for source in sources.weights:
                ms, ns = source.shape
                widths = {"rows": (n, ns), "cols": (m, ms)}
                for qr in READINGS:
                    for kr in READINGS:
                        module = attention[self._key(qr, kr, widths[qr][0], widths[kr][1])]
                        parts.append(read(module(read(x, qr), read(source, kr)), qr))
            x = ffn[str(n)](torch.stack(parts).mean(0))
        eye = torch.eye(m, dtype=x.dtype, device=x.device).expand(n_targets, m, m)
        return eye, x

    def mixtures(self) -> list:
        """No learned mixture: the four attentions are averaged, as in the reference."""
        return []

    @contextmanager
    def capturing(self, enabled: bool = True) -> Iterator[dict]:
        """Nothing is captured: :meth:`attention_shares` is not measured for this adapter."""
        yield {}

    def attention_shares(self, captured: dict, sources: object, columns: torch.Tensor) -> None:
        return None
