"""LPKA: the low-rank parametric knowledge adapter (MergeNet eq. 3 and 6), server side.

A target layer's factors ``A: (m, R)``, ``B: (R, n)`` attend to the factors of its sources.
Each factor is read as a token sequence in two ways:

========  ===========================  ===========================
factor    ``rows``                     ``cols``
========  ===========================  ===========================
``A``     ``m`` tokens of width ``R``  ``R`` tokens of width ``m``
``B``     ``R`` tokens of width ``n``  ``n`` tokens of width ``R``
========  ===========================  ===========================

Rows of ``A`` and columns of ``B`` have width ``R`` for every layer of every model: their
projections are shared by all layers. The other two readings need a projection per width,
created from the shapes that clients report (:meth:`LPKA.register_shapes`).

A knowledge-transfer layer (KTL) lets the target's ``A`` attend to the sources' ``A`` and the
target's ``B`` to the sources' ``B``, for the four (query reading, key reading) combinations,
and mixes the four results with softmax weights ``λ`` (paper eq. 6). Every branch ends in a
zero-initialised projection added to its input (pre-norm residual), so an untrained adapter
returns the target's factors exactly.

Variants (the paper's ablations): ``lpka`` (four combinations, learned ``λ``), ``avg`` (four,
plain mean), ``rows`` (rows attend to rows only), ``mlp`` (no attention: an MLP of the pooled
source tokens gives the update, so the target's own factors do not shape it). These start as
the identity. Two more follow the paper and its reference code instead: ``paper`` (the four
combinations with learned ``λ``, post-norm attention and feed-forward blocks whose output
overwrites the target's low-rank part; not the identity at start) and ``paper_mlp`` (the
paper's MLP baseline: the pooled sources alone generate the target's factors).
``source_norm=False`` feeds the source tokens to the keys without LayerNorm, so that the
adapter sees the sources' scale.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("lpka", "avg", "rows", "mlp", "paper", "paper_mlp", "reference")
OVERWRITING = ("paper", "paper_mlp", "reference")  # not the identity at start
READINGS = ("rows", "cols")
FACTORS = ("A", "B")
# The reading of each factor whose token width is the rank R (shared across layers).
SHARED_READING = {"A": "rows", "B": "cols"}


@dataclass(frozen=True)
class AdapterConfig:
    """Hyper-parameters of the adapter (defaults: the paper's reference configuration).

    ``max_source_tokens`` caps the tokens a source layer contributes to a long reading (rows
    of ``A``, columns of ``B``); ``None`` attends to every token, exactly as in the paper, at a
    cost that grows with the layer sizes.

    ``reference`` (:mod:`mergenet_fl.reference`) works on whole weights instead of factors:
    ``rank``, ``dim``, ``max_source_tokens`` and ``source_norm`` do not apply; ``heads``,
    ``layers``, ``dropout`` (attention) and ``ffn_dropout`` (feed-forward) do, and ``max_rows``
    is the largest layer (in output rows) that may travel whole.
    """

    variant: str = "lpka"
    rank: int = 8
    dim: int = 64
    heads: int = 4
    layers: int = 2
    max_source_tokens: int | None = 16
    source_norm: bool = True
    seed: int = 0
    dropout: float = 0.1
    ffn_dropout: float = 0.2
    max_rows: int = 1024

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"AdapterConfig.variant={self.variant!r}; choose one of {VARIANTS}")
        for name in ("rank", "dim", "heads", "layers", "max_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"AdapterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"AdapterConfig.dim={self.dim} is not divisible by heads={self.heads}")
        if self.max_source_tokens is not None and self.max_source_tokens < 1:
            raise ValueError(
                f"AdapterConfig.max_source_tokens must be >= 1 or None, "
                f"got {self.max_source_tokens}"
            )

        for name in ("dropout", "ffn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(
                    f"AdapterConfig.{name} must be in [0, 1), got {getattr(self, name)}"
                )

    @property
    def full(self) -> bool:
        """Whether layers travel as whole weights (the ``reference`` adapter's input)."""
        return self.variant == "reference"

    @property
    def identity_at_start(self) -> bool:
        return self.variant not in OVERWRITING

    @property
    def combos(self) -> tuple[tuple[str, str], ...]:
        """The (query reading, key reading) pairs the variant uses."""
        if self.variant == "rows":
            return (("rows", "rows"),)
        return tuple((q, k) for q in READINGS for k in READINGS)


def read(x: torch.Tensor, reading: str) -> torch.Tensor:
    """Tokens of ``x: (..., p, q)``: ``rows`` -> ``(..., p, q)``, ``cols`` -> ``(..., q, p)``."""
    return x if reading == "rows" else x.transpose(-1, -2)


def token_width(factor: str, reading: str, m: int, n: int, rank: int) -> int:
    """Width of a token of ``factor`` (of an ``m x n`` layer) in ``reading``."""
    if reading == SHARED_READING[factor]:
        return rank
    return m if factor == "A" else n


def compress_tokens(tokens: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """At most ``max_tokens`` tokens from ``tokens: (L, w)``, deterministically.

    Tokens are ordered by their first coordinate (the leading singular direction) and
    averaged in ``max_tokens`` contiguous bins, so each kept token stands for similar ones.
    """
    if max_tokens is None or tokens.shape[0] <= max_tokens:
        return tokens
    order = torch.argsort(tokens[:, 0], stable=True)
    pooled = F.adaptive_avg_pool1d(tokens[order].T.unsqueeze(0), max_tokens)
    return pooled.squeeze(0).T.contiguous()


@dataclass(frozen=True)
class SourceTokens:
    """The raw key tokens of a set of source layers, per (factor, reading).

    ``tokens[(factor, reading)]`` is a list of ``(width, (L_w, width))`` groups, one per token
    width, so that each group goes through its own width's projection; ``owners`` gives, in
    the same order, the index of the source layer each token came from (``(L_w,)``, int64).
    ``shapes`` lists the ``(m_s, n_s)`` of the source layers (the adapter needs projections
    for them).
    """

    tokens: dict[tuple[str, str], list[tuple[int, torch.Tensor]]]
    shapes: tuple[tuple[int, int], ...]
    owners: dict[tuple[str, str], list[torch.Tensor]]

    @classmethod
    def build(
        cls,
        factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
        rank: int,
        max_tokens: int | None,
    ) -> SourceTokens:
        """From source factors ``[(A_s: (m_s, R), B_s: (R, n_s)), ...]`` (at least one)."""
        if not factors:
            raise ValueError("a target needs at least one source layer")
        groups: dict[tuple[str, str], dict[int, list[tuple[int, torch.Tensor]]]] = {}
        for owner, (a, b) in enumerate(factors):
            for factor, x in (("A", a), ("B", b)):
                for reading in READINGS:
                    t = read(x, reading)
                    if reading == SHARED_READING[factor]:
                        t = compress_tokens(t, max_tokens)
                    by_width = groups.setdefault((factor, reading), {})
                    by_width.setdefault(t.shape[1], []).append((owner, t))
        tokens, owners = {}, {}
        for key, by_width in groups.items():
            ordered = sorted(by_width.items())
            tokens[key] = [(w, torch.cat([t for _, t in ts])) for w, ts in ordered]
            owners[key] = [
                torch.cat([torch.full((t.shape[0],), o, dtype=torch.int64) for o, t in ts])
                for _, ts in ordered
            ]
        shapes = tuple(dict.fromkeys((a.shape[0], b.shape[1]) for a, b in factors))
        return cls(tokens, shapes, owners)

    def to(self, device: torch.device | str) -> SourceTokens:
        """The same tokens on ``device``."""
        moved = {k: [(w, t.to(device)) for w, t in group] for k, group in self.tokens.items()}
        return SourceTokens(moved, self.shapes, self.owners)


class WidthLinear(nn.Module):
    """One ``nn.Linear`` per token width, created on registration, deterministically seeded.

    ``to_dim=True`` maps ``width -> dim``; ``False`` maps ``dim -> width`` and starts at zero.
    """

    def __init__(self, dim: int, *, to_dim: bool, seed: int, path: str, zero: bool = True) -> None:
        super().__init__()
        self.dim, self.to_dim, self.seed, self.path = dim, to_dim, seed, path
        self.zero = zero and not to_dim  # output projections start at zero unless told not to
        self.by_width = nn.ModuleDict()

    def register(self, width: int) -> list[nn.Parameter]:
        """Create the projection for ``width`` if new; return the new parameters."""
        key = str(width)
        if key in self.by_width:
            return []
        layer = nn.Linear(width, self.dim) if self.to_dim else nn.Linear(self.dim, width)
        if self.zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        else:
            gen = torch.Generator().manual_seed(
                zlib.crc32(f"{self.seed}:{self.path}:{key}".encode())
            )
            bound = layer.weight.shape[1] ** -0.5
            with torch.no_grad():
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.zero_()
        self.by_width[key] = layer
        return list(layer.parameters())

    def forward(self, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """``(..., w) -> (..., dim)``; with ``to_dim=False``, ``(..., dim) -> (..., w)``."""
        layer = self.by_width[str(x.shape[-1] if self.to_dim else width)]
        return F.linear(x, layer.weight, layer.bias)  # the module call costs more than the op


class Capture:
    """Whether forward passes keep what their attention needs, and what they kept: branch
    path -> ``(q, k, N, Lq)``, the query and key heads (detached). One per adapter, shared by
    its branches; the attention itself is computed only when asked for
    (:meth:`LPKA.attention_shares`), not in the pass."""

    def __init__(self) -> None:
        self.on = False
        self.heads: dict[str, tuple[torch.Tensor, torch.Tensor, int, int]] = {}


@dataclass
class KeyMemo:
    """The normalised key tokens of one source set and each branch's key and value heads,
    kept for the next pass over the same sources (their cost does not depend on the target).

    Valid while the adapter's parameters are unchanged. With gradients on, the passes that
    share it share the graph of its tensors: backpropagate them together, in one call.
    """

    keys: dict[tuple[str, str], list[tuple[int, torch.Tensor]]] | None = None
    heads: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class Branch(nn.Module):
    """Multi-head attention of one factor's query reading on one key reading of the sources."""

    def __init__(self, cfg: AdapterConfig, path: str, capture: Capture) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.q = WidthLinear(cfg.dim, to_dim=True, seed=cfg.seed, path=f"{path}.q")
        self.k = WidthLinear(cfg.dim, to_dim=True, seed=cfg.seed, path=f"{path}.k")
        self.v = WidthLinear(cfg.dim, to_dim=True, seed=cfg.seed, path=f"{path}.v")
        self.o = WidthLinear(
            cfg.dim, to_dim=False, seed=cfg.seed, path=f"{path}.o", zero=cfg.identity_at_start
        )
        self.path = path
        self.capture = capture

    def forward(
        self,
        query: torch.Tensor,
        keys: list[tuple[int, torch.Tensor]],
        memo: KeyMemo | None = None,
    ) -> torch.Tensor:
        """``query: (N, Lq, w)`` (normalised by the caller where the variant does), key groups
        ``[(w_i, (L_i, w_i))]`` (likewise, see :func:`key_tokens`) -> update ``(N, Lq, w)``.
        The key and value heads come from ``memo`` when it has them, and go there when not.

        With the adapter's :class:`Capture` on, it keeps its query and key heads, from which
        :meth:`LPKA.attention_shares` computes the attention later.
        """
        n, lq, w = query.shape
        q = self.q(query)
        h, d = self.heads, q.shape[-1] // self.heads
        # The keys are the same for every target of a batch: fold the batch into the queries.
        q = q.reshape(1, n * lq, h, d).transpose(1, 2)
        if memo is not None and self.path in memo.heads:
            k, v = memo.heads[self.path]
        else:
            k = _cat([self.k(t) for _, t in keys]).reshape(1, -1, h, d).transpose(1, 2)
            v = _cat([self.v(t) for _, t in keys]).reshape(1, -1, h, d).transpose(1, 2)
            if memo is not None:
                memo.heads[self.path] = (k, v)
        out = F.scaled_dot_product_attention(q, k, v)
        if self.capture.on:
            self.capture.heads[self.path] = (q.detach(), k.detach(), n, lq)
        out = out.transpose(1, 2).reshape(n, lq, h * d)
        return self.o(out, w)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def key_tokens(
    sources: SourceTokens, norm: bool
) -> dict[tuple[str, str], list[tuple[int, torch.Tensor]]]:
    """The sources' key token groups, each token LayerNorm-ed (without affine) when ``norm``.

    Parameter-free, so one forward pass computes them once for every branch and KTL.
    """
    if not norm:
        return sources.tokens
    return {
        key: [(w, F.layer_norm(t, (w,))) for w, t in groups]
        for key, groups in sources.tokens.items()
    }


class FeedForward(nn.Module):
    """Residual MLP on the shared-width tokens: pre-norm with the output layer at zero (the
    identity at start), or post-norm (``LayerNorm(x + mlp(x))``, the reference code's)."""

    def __init__(self, width: int, hidden: int, post_norm: bool = False) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width) if post_norm else None
        if not post_norm:
            nn.init.zeros_(self.down.weight)
            nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            return self.norm(x + self.down(F.gelu(self.up(x))))
        return x + self.down(F.gelu(self.up(F.layer_norm(x, (x.shape[-1],)))))


class TransferLayer(nn.Module):
    """One KTL: ``x ← x + Σ_k λ_k · branch_k(x, sources)``, then the feed-forward block."""

    def __init__(self, cfg: AdapterConfig, path: str, capture: Capture) -> None:
        super().__init__()
        self.cfg, self.path = cfg, path
        self.branches = nn.ModuleDict(
            {
                f"{f}_{qr}_{kr}": Branch(cfg, f"{path}.{f}_{qr}_{kr}", capture)
                for f in FACTORS
                for qr, kr in cfg.combos
            }
        )
        post = not cfg.identity_at_start
        self.ffn = nn.ModuleDict({f: FeedForward(cfg.rank, cfg.dim, post) for f in FACTORS})
        # post-norm after the attention (the reference code's); the identity design has none
        self.norm = nn.ModuleDict({f: nn.LayerNorm(cfg.rank) for f in FACTORS}) if post else None
        logits = torch.zeros(len(FACTORS), len(cfg.combos))
        if cfg.variant in ("lpka", "paper"):
            self.mix_logits = nn.Parameter(logits)
        else:
            self.register_buffer("mix_logits", logits)

    def mixture(self) -> torch.Tensor:
        """``λ: (2, C)``: the softmax weights of the (query, key) readings, per factor."""
        return torch.softmax(self.mix_logits, dim=1)

    def forward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        keys: dict[tuple[str, str], list[tuple[int, torch.Tensor]]],
        memo: KeyMemo | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One KTL on ``a: (N, m, R)``, ``b: (N, R, n)`` with the sources' :func:`key_tokens`."""
        out = []
        for fi, (f, x) in enumerate((("A", a), ("B", b))):
            lam = torch.softmax(self.mix_logits[fi], dim=0)
            # each query reading is normalised once for the branches that share it (pre-norm;
            # the paper variants normalise after the attention, as the reference code does)
            queries = {}
            for qr in dict.fromkeys(qr for qr, _ in self.cfg.combos):
                t = read(x, qr)
                queries[qr] = F.layer_norm(t, (t.shape[-1],)) if self.cfg.identity_at_start else t
            parts = [
                read(self.branches[f"{f}_{qr}_{kr}"](queries[qr], keys[(f, kr)], memo), qr)
                for qr, kr in self.cfg.combos
            ]
            # Σ_k λ_k · part_k in three ops (and three backward nodes), not 3 per branch
            x = x + (lam.view(-1, 1, 1, 1) * torch.stack(parts)).sum(0)
            shared = SHARED_READING[f]
            if self.norm is not None:
                x = read(self.norm[f](read(x, shared)), shared)
            out.append(read(self.ffn[f](read(x, shared)), shared))
        return out[0], out[1]


class SourceMLP(nn.Module):
    """The ``mlp`` ablation: pooled source tokens -> MLP -> a target-independent update."""

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        readings = [(f, r) for f in FACTORS for r in READINGS]
        self.embed = nn.ModuleDict(
            {
                f"{f}_{r}": WidthLinear(cfg.dim, to_dim=True, seed=cfg.seed, path=f"mlp.{f}_{r}")
                for f, r in readings
            }
        )
        blocks = []
        for _ in range(cfg.layers):
            blocks += [nn.Linear(len(readings) * cfg.dim, len(readings) * cfg.dim), nn.GELU()]
        self.mlp = nn.Sequential(*blocks)
        self.head = nn.ModuleDict(
            {
                f: WidthLinear(
                    len(readings) * cfg.dim,
                    to_dim=False,
                    seed=cfg.seed,
                    path=f"mlp.{f}",
                    zero=cfg.identity_at_start,
                )
                for f in FACTORS
            }
        )

    def forward(
        self, a: torch.Tensor, b: torch.Tensor, sources: SourceTokens
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = []
        for key, groups in sorted(key_tokens(sources, self.cfg.source_norm).items()):
            emb = self.embed[f"{key[0]}_{key[1]}"]
            pooled.append(_cat([emb(t) for _, t in groups]).mean(0))
        z = self.mlp(torch.cat(pooled))
        (m, r), n = a.shape[-2:], b.shape[-1]
        delta_a = self.head["A"](z, m * r).reshape(m, r)
        delta_b = self.head["B"](z, r * n).reshape(r, n)
        if not self.cfg.identity_at_start:  # the paper's baseline: generated, not added
            return delta_a.expand_as(a), delta_b.expand_as(b)
        return a + delta_a, b + delta_b


class LPKA(nn.Module):
    """The adapter: a stack of KTLs (or the ``mlp`` ablation) over low-rank factors.

    Call :meth:`register_shapes` with every ``(m, n)`` a client reports before
    :meth:`forward` sees it; it returns the parameters it created, for the optimiser.
    """

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.capture = Capture()
        with torch.random.fork_rng(devices=[]):  # the same seed always builds the same adapter
            torch.manual_seed(cfg.seed)
            if cfg.variant in ("mlp", "paper_mlp"):
                self.body: nn.Module = SourceMLP(cfg)
            else:
                self.body = nn.ModuleList(
                    TransferLayer(cfg, f"ktl{i}", self.capture) for i in range(cfg.layers)
                )
        self.registered: list[tuple[int, int]] = []

    def register_shapes(self, shapes: Iterable[tuple[int, int]]) -> list[nn.Parameter]:
        """Create projections for layers of these ``(m, n)`` shapes; return new parameters."""
        new: list[nn.Parameter] = []
        for m, n in shapes:
            m, n = int(m), int(n)
            if (m, n) not in self.registered:
                self.registered.append((m, n))
                new += self._register(m, n)
        return new

    def _register(self, m: int, n: int) -> list[nn.Parameter]:
        r, new = self.cfg.rank, []
        if isinstance(self.body, SourceMLP):
            for f in FACTORS:
                for reading in READINGS:
                    new += self.body.embed[f"{f}_{reading}"].register(
                        token_width(f, reading, m, n, r)
                    )
            new += self.body.head["A"].register(m * r) + self.body.head["B"].register(r * n)
            return new
        for ktl in self.body:
            for f in FACTORS:
                for qr, kr in self.cfg.combos:
                    br = ktl.branches[f"{f}_{qr}_{kr}"]
                    wq, wk = token_width(f, qr, m, n, r), token_width(f, kr, m, n, r)
                    new += br.q.register(wq) + br.o.register(wq)
                    new += br.k.register(wk) + br.v.register(wk)
        return new

    def forward(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        sources: SourceTokens,
        memo: KeyMemo | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged factors for a batch of targets that share ``sources``.

        ``a: (N, m, R)``, ``b: (N, R, n)`` -> ``A': (N, m, R)``, ``B': (N, R, n)``. ``memo``
        (one per source set) lets passes over the same sources share their key projections.
        """
        if a.shape[-1] != self.cfg.rank or b.shape[-2] != self.cfg.rank:
            raise ValueError(
                f"adapter works at rank {self.cfg.rank}: got A{tuple(a.shape)} B{tuple(b.shape)}"
                " (pad lower ranks with mergenet_fl.lowrank.pad_rank)"
            )
        if isinstance(self.body, SourceMLP):
            return self.body(a, b, sources)
        if memo is None:
            keys = key_tokens(sources, self.cfg.source_norm)
        else:
            if memo.keys is None:
                memo.keys = key_tokens(sources, self.cfg.source_norm)
            keys = memo.keys
        for ktl in self.body:
            a, b = ktl(a, b, keys, memo)
        return a, b

    def mixtures(self) -> list[list[list[float]]]:
        """``λ`` of every KTL: ``[ktl][factor A, B][combination]`` (empty for ``mlp``)."""
        if isinstance(self.body, SourceMLP):
            return []
        return [ktl.mixture().tolist() for ktl in self.body]

    @contextmanager
    def capturing(self, enabled: bool = True) -> Iterator[dict]:
        """Forward passes inside keep what :meth:`attention_shares` needs, in the dict this
        yields (branch path -> query and key heads: references, no copies); the dict stays
        the caller's after the block."""
        self.capture.on, self.capture.heads = enabled, {}
        try:
            yield self.capture.heads
        finally:
            self.capture.on, self.capture.heads = False, {}

    @torch.no_grad()
    def attention_shares(
        self, captured: dict, sources: SourceTokens, columns: torch.Tensor
    ) -> torch.Tensor | None:
        """How much attention each column of source layers received in a forward pass run
        under :meth:`capturing` (``captured``: what it yielded; the adapter's parameters
        unchanged since): ``(N, C)``, rows sum to 1. ``columns: (num_sources,)`` int64 gives
        the column (``0 .. C-1``) of each source layer, e.g. its architecture group.

        The attention of every branch of every KTL, averaged over heads and query tokens,
        weighted by the branch's ``λ``, summed over each column's tokens and averaged over the
        KTLs. None for the ``mlp`` variant, which does not attend.
        """
        if isinstance(self.body, SourceMLP):
            return None
        width = int(columns.max()) + 1
        # Attention over values that one-hot each key token's column is each query's share per
        # column, without forming the (N·Lq, L) weights; padded to the heads' width d, the
        # fused kernel runs. Key reading -> (L, max(C, d)).
        onehots: dict[tuple[str, str], torch.Tensor] = {}
        total = None
        for ktl in self.body:
            lam = ktl.mixture() / len(FACTORS)
            for fi, f in enumerate(FACTORS):
                for ci, (qr, kr) in enumerate(self.cfg.combos):
                    heads = captured.get(f"{ktl.path}.{f}_{qr}_{kr}")
                    if heads is None:
                        raise RuntimeError(
                            "attention_shares needs a forward pass under capturing()"
                        )
                    q, k, n, lq = heads  # (1, h, N·Lq, d), (1, h, L, d)
                    if (f, kr) not in onehots:
                        owner = torch.cat(sources.owners[(f, kr)])
                        onehot = F.one_hot(columns[owner], max(width, q.shape[-1]))
                        onehots[(f, kr)] = onehot.to(q)
                    values = onehots[(f, kr)].expand(*k.shape[:2], -1, -1)
                    weights = F.scaled_dot_product_attention(q, k, values)[..., :width]
                    shares = weights.mean(1).reshape(n, lq, width).mean(1)  # (N, C)
                    total = lam[fi, ci] * shares if total is None else total + lam[fi, ci] * shares
        return total.float().cpu() / len(self.body)
