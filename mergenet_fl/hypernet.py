"""The server's side of a transfer round: generate merged factors, then learn from the replies.

One round, for the clients that take part:

1. :meth:`Hypernetwork.generate` plans each target layer's sources from the knowledge bank,
   runs the adapter, and returns the merged factors with a :class:`Generation` record of the
   inputs that produced them.
2. Clients install, train and answer with gradient pieces ``(G_A, G_B)``.
3. :meth:`Hypernetwork.update` takes one optimiser step with the pFedHN rule,
   ``∇φ = Σ_clients autograd.grad([A', B'], φ, grad_outputs=[G_A, G_B])``. A round of at
   most ``chunk_size`` target rows keeps step 1's autograd graph for it (small rounds are
   where a second pass costs most beside the work); a larger round recomputes the forward
   pass here on the recorded inputs, a chunk at a time, so memory stays that of one chunk.
   The ``reference`` adapter generates with dropout on: each pass draws its random stream
   from a seed of (adapter seed, round, job, chunk), so that a recomputed pass draws the same
   masks (its spectral norm's power iteration moves on: equal within about 1e-5).
"""

from __future__ import annotations

import copy
import logging
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache, partial

import torch

from mergenet_fl.adapter import LPKA, AdapterConfig, KeyMemo, SourceTokens
from mergenet_fl.bank import KnowledgeBank
from mergenet_fl.lowrank import pad_rank, product_norm
from mergenet_fl.packet import FactorPair, KnowledgePacket, PacketError
from mergenet_fl.reference import ReferenceAdapter, WeightSources

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
COMBINES = ("sum", "median", "trimmed")
SOURCES = ("real", "random", "none")


@dataclass(frozen=True)
class HypernetConfig:
    """How the adapter learns and where its sources come from.

    ``summarize_groups``: each architecture group is one source (its members' mean weight,
    re-encoded), so cost grows with groups, not clients; a target's own group is a source when
    it has other members. Otherwise every other client is a source of its own.
    ``self_transfer``: a target layer also attends to the client's other transfer layers.
    ``group_targets``: the members of a group with several members are one target: the adapter
    reads the group's summary as the target's own factors and every member gets the same merged
    factors (what a group that averages its other parameters needs; at initialisation this is
    the group's mean of the transfer layers). Lone members stay targets of their own.
    ``optimizer`` (``adam``, ``adamw``, ``sgd``), ``lr`` (0: a frozen adapter), ``weight_decay``
    (never on biases and normalisation weights: the adapter's 1-D parameters): the adapter's
    optimiser. The step size rises linearly over ``warmup_steps`` adapter steps, stays for
    ``hold_steps``, then, with ``decay_steps``, follows a cosine to 0 at step
    ``warmup_steps + hold_steps + decay_steps`` (the reference code's AdamW with a cosine
    schedule after a constant start).
    ``chunk_size``: targets per forward/backward pass in :meth:`Hypernetwork.update`, and the
    most target rows of a round whose autograd graph :meth:`Hypernetwork.generate` keeps for
    it (memory).
    ``device``: where the adapter runs (inputs move there, merged factors come back to the CPU).
    ``source``: the controls that tell knowledge from re-parametrisation. ``real``: the
    sources above. ``random``: each source replaced by a fixed random weight of its shape and
    of its norm when first seen (seeded by its owner and layer, the same in every round), so
    that the adapter never sees another client's weights. ``none``: a target attends to its
    own factors only.
    ``combine``: how the clients' contributions to the adapter's gradient add up: ``sum``
    (the pFedHN rule: one backward pass per chunk of targets), or, per coordinate, ``median``
    or ``trimmed`` (``trim`` of the rows dropped at each end), times the number of rows, so
    that a minority of clients cannot steer the shared adapter; these cost one backward pass
    and one gradient-sized vector per replying target row.
    ``update_rows``: the most target rows one adapter step backpropagates. A round whose
    replying rows are more takes its step from a uniform sample of that many (seeded by the
    adapter's seed and the round), its gradient scaled by replying rows / sample so that its
    expectation is the full sum's (minibatch SGD over clients, as pFedHN steps per client);
    ``None``: every row, always. Every merged factor is exact either way: only the step is
    estimated, and only in rounds larger than this.
    ``diagnostics``: measure each target's ``transfer_effect`` and attention shares (one more
    adapter pass per batch of targets that has sources of its own group), when
    :meth:`Generation.measure` asks, or, in a round larger than one chunk, on the first
    ``diagnostic_rows`` targets of each job (a sample per layer and source set, in a pass of
    their own: the diagnostics are read as group means).
    """

    adapter: AdapterConfig = AdapterConfig()
    optimizer: str = "adam"
    lr: float = 1e-5  # chosen on validation (study paper-tune): 1e-4 and up hurt over many steps
    weight_decay: float = 0.0
    warmup_steps: int = 0
    hold_steps: int = 0
    decay_steps: int | None = None
    max_grad_norm: float | None = 1.0
    summarize_groups: bool = True
    self_transfer: bool = False
    group_targets: bool = False
    chunk_size: int = 64
    update_rows: int | None = 256
    diagnostic_rows: int = 8
    device: str = "cpu"
    diagnostics: bool = True
    source: str = "real"
    combine: str = "sum"
    trim: float = 0.2

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"HypernetConfig.optimizer={self.optimizer!r}; choose {OPTIMIZERS}")
        if self.combine not in COMBINES:
            raise ValueError(f"HypernetConfig.combine={self.combine!r}; choose {COMBINES}")
        if not 0.0 <= self.trim < 0.5:
            raise ValueError(f"HypernetConfig.trim must be in [0, 0.5), got {self.trim}")
        if self.source not in SOURCES:
            raise ValueError(f"HypernetConfig.source={self.source!r}; choose {SOURCES}")
        if not self.lr >= 0:  # 0: a frozen adapter (the method's untrained edge)
            raise ValueError(f"HypernetConfig.lr must be >= 0, got {self.lr}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(
                f"HypernetConfig.max_grad_norm must be > 0 or None, got {self.max_grad_norm}"
            )
        if self.weight_decay < 0 or self.warmup_steps < 0 or self.hold_steps < 0:
            raise ValueError("HypernetConfig.weight_decay, warmup_steps, hold_steps must be >= 0")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ValueError(f"HypernetConfig.decay_steps must be >= 1, got {self.decay_steps}")
        if self.update_rows is not None and self.update_rows < 1:
            raise ValueError(
                f"HypernetConfig.update_rows must be >= 1 or None, got {self.update_rows}"
            )
        if self.chunk_size < 1 or self.diagnostic_rows < 1:
            raise ValueError(
                "HypernetConfig.chunk_size and diagnostic_rows must be >= 1, got "
                f"{self.chunk_size} and {self.diagnostic_rows}"
            )


@dataclass(frozen=True)
class Job:
    """Targets that share one layer shape and one source set: ``a: (N, m, R)``, ``b: (N, R, n)``.

    Row ``i`` is the target of the clients ``members[i]`` (one client, or a whole group with
    ``group_targets``); they all get that row's merged factors.
    """

    layer: str
    members: tuple[tuple[str, ...], ...]
    a: torch.Tensor
    b: torch.Tensor
    sources: SourceTokens | WeightSources  # what the adapter reads (tokens, or whole weights)
    group: str  # the targets' architecture group
    source_groups: tuple[str, ...]  # the group of each source layer, in token-owner order
    source_factors: tuple[FactorPair, ...]  # padded to rank R (whole weights: as they came)

    @property
    def clients(self) -> tuple[str, ...]:
        return tuple(c for row in self.members for c in row)


@dataclass(frozen=True)
class Generation:
    """The inputs that produced one round's merged factors, for the matching update."""

    round: int
    jobs: tuple[Job, ...]
    #: job index -> the adapter's outputs ``(A', B')`` with their autograd graph, for the
    #: update: used once, and only while the adapter's parameters are as they were
    outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)
    adapter_version: tuple[int, ...] = ()
    #: measurements not taken yet, each giving ``[(client, layer, stats)]``
    pending: list[Callable[[], list[tuple[str, str, dict]]]] = field(
        default_factory=list, repr=False
    )
    measured: dict[str, dict[str, dict]] = field(default_factory=dict, repr=False)
    _sent: dict[str, dict[str, tuple[int, int, int]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def measure(self) -> None:
        """Take the pending measurements. They need the adapter as it generated, so this
        must come before it changes (:meth:`Hypernetwork.update` calls it first); a strategy
        can call it while its clients train, off the round's critical path."""
        while self.pending:
            _record(self.measured, self.pending.pop(0)())

    @property
    def diagnostics(self) -> dict[str, dict[str, dict]]:
        """Client -> layer -> ``transfer_effect`` and ``attention`` (source group -> share)."""
        self.measure()
        return self.measured

    def targets(self) -> dict[str, dict[str, tuple[int, int, int]]]:
        """Client -> layer -> ``(m, R, n)`` of the merged factors it was sent (built on the
        first call and shared by the later ones, which check one client each: read only)."""
        if not self._sent:
            for job in self.jobs:
                _, m, r = job.a.shape
                for cid in job.clients:
                    self._sent.setdefault(cid, {})[job.layer] = (m, r, job.b.shape[2])
        return self._sent

    def inputs(self) -> dict[str, dict[str, FactorPair]]:
        """Client -> layer -> the target factors ``(A: (m, R), B: (R, n))`` the adapter was
        given for it: what the client must subtract when it installs the merged factors."""
        out: dict[str, dict[str, FactorPair]] = {}
        for job in self.jobs:
            for row, members in enumerate(job.members):
                for cid in members:
                    out.setdefault(cid, {})[job.layer] = (job.a[row], job.b[row])
        return out

    def check_pieces(self, client_id: str, pieces: Mapping[str, FactorPair]) -> None:
        """Raise :class:`PacketError` unless ``pieces`` answer exactly what the client was sent."""
        sent = self.targets().get(client_id)
        if sent is None:
            raise PacketError(f"client {client_id!r} sent gradient pieces but got no factors")
        if set(pieces) != set(sent):
            raise PacketError(
                f"client {client_id!r}: gradient pieces for layers {sorted(pieces)}, "
                f"expected {sorted(sent)}"
            )
        for layer, (ga, gb) in pieces.items():
            m, r, n = sent[layer]
            if tuple(ga.shape) != (m, r) or tuple(gb.shape) != (r, n):
                raise PacketError(
                    f"client {client_id!r} layer {layer!r}: pieces G_A{tuple(ga.shape)} "
                    f"G_B{tuple(gb.shape)}, expected ({m}, {r}) and ({r}, {n})"
                )
            if not (torch.isfinite(ga).all() and torch.isfinite(gb).all()):
                raise PacketError(f"client {client_id!r} layer {layer!r}: non-finite pieces")


class Hypernetwork:
    """The LPKA adapter with its optimiser: generates merged factors and learns from replies."""

    def __init__(self, cfg: HypernetConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.full = cfg.adapter.full  # whole weights, not rank-R factors
        adapter = ReferenceAdapter(cfg.adapter) if self.full else LPKA(cfg.adapter)
        self.adapter: LPKA | ReferenceAdapter = adapter.to(self.device)
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0  # adapter steps taken (the schedule's clock)
        # the adapter's parameters, listed again only when shapes add some (walking the
        # module tree on every use costs milliseconds per round)
        self.params = list(self.adapter.parameters())
        self.random_sources: dict[str, FactorPair] = {}  # source=random: by owner and layer

    @property
    def rank(self) -> int:
        """The largest rank of the factors that travel: ``R``, or for whole weights
        ``(I_m, W)`` the most rows a layer may have."""
        return self.cfg.adapter.max_rows if self.full else self.cfg.adapter.rank

    def register_shapes(self, shapes: Sequence) -> None:
        """Create adapter projections for new layer shapes (``(m, n)``; for the reference
        adapter ``((m, n), (m_s, n_s))`` target–source pairs), one optimiser group per shape
        (two with weight decay: the 1-D parameters are not decayed)."""
        for shape in shapes:
            params = self.adapter.register_shapes([shape])
            if not params:
                continue
            self.adapter.to(self.device)  # moves the new parameters in place
            self.params = list(self.adapter.parameters())
            if self.optimizer is None:
                self.optimizer = self._make_optimizer(params)
            else:
                for group in self._param_groups(params):
                    self.optimizer.add_param_group(group)

    def _param_groups(self, params: list[torch.nn.Parameter]) -> list[dict]:
        """Biases and normalisation weights (1-D) without weight decay, as the reference."""
        if not self.cfg.weight_decay:
            return [{"params": params}]
        decayed = [p for p in params if p.ndim > 1]
        plain = [p for p in params if p.ndim <= 1]
        groups = [{"params": decayed}] if decayed else []
        return groups + ([{"params": plain, "weight_decay": 0.0}] if plain else [])

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        # The parameters that exist from the start (e.g. the mixing weights λ) join the first group.
        fresh = {id(p) for p in params}
        base = [p for p in self.adapter.parameters() if id(p) not in fresh]
        kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
        # hundreds of small tensors: one fused kernel per step, not a loop over them
        fast = {"foreach": True} if self.cfg.optimizer == "sgd" else {"fused": True}
        return kinds[self.cfg.optimizer](
            self._param_groups(base + params),
            lr=self.cfg.lr,
            weight_decay=self.cfg.weight_decay,
            **fast,
        )

    def lr_at(self, step: int) -> float:
        """The step size of adapter step ``step`` (0-based): warm-up, hold, cosine decay."""
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.decay_steps is None:
            return cfg.lr
        start = cfg.warmup_steps + cfg.hold_steps
        progress = min(max(step - start, 0) / cfg.decay_steps, 1.0)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def plan(self, bank: KnowledgeBank, targets: Sequence[str]) -> list[Job]:
        """Group targets by (layer, source set) so each group is one batched adapter pass."""
        groups = bank.groups()
        summaries: dict[str, KnowledgePacket] = {}
        token_cache: dict[object, SourceTokens | WeightSources] = {}
        # (source set, layer) -> layer, row -> members, row -> target factors, sources, groups
        batches: dict[object, tuple[str, dict, dict, list, list]] = {}

        def summary(group: str) -> KnowledgePacket:
            if group not in summaries:
                summaries[group] = bank.summary(group, self.rank)
            return summaries[group]

        for cid in sorted(set(targets)):
            if cid not in bank or bank.get(cid).send_only:
                continue
            entry = bank.get(cid)
            grouped = self.cfg.group_targets and len(groups[entry.group]) > 1
            own = summary(entry.group) if grouped else entry.packet
            row: tuple[str, str] = ("group", entry.group) if grouped else ("client", cid)
            # (group, owner, packet) of every source
            if self.cfg.summarize_groups:
                # every group with another member is a source, the target's own included
                peers = [
                    (g, f"group {g}", summary(g))
                    for g, ms in groups.items()
                    if g != entry.group or len(ms) > 1
                ]
                source_key: object = entry.group
            else:
                # every other client; a group target reads all of its members too
                peers = [
                    (bank.get(c).group, f"client {c}", bank.get(c).packet)
                    for c in bank
                    if c != cid or grouped
                ]
                source_key = row
            owner = f"{row[0]} {row[1]}"
            for layer, lf in own.layers.items():
                if self.cfg.source == "none":  # the target's own factors, and nothing else
                    named, labels = [(f"{owner}/{layer}", (lf.a, lf.b))], [entry.group]
                    key: tuple[object, str] = (row, layer)
                else:
                    named = [(f"{o}/{n}", f) for _, o, p in peers for n, f in p.factors().items()]
                    labels = [g for g, _, p in peers for _ in p.factors()]
                    key = (source_key, layer)
                    if self.cfg.self_transfer:  # its other layers too
                        mine = own.factors().items()
                        named += [(f"{owner}/{n}", f) for n, f in mine if n != layer]
                        labels += [entry.group] * (len(mine) - 1)
                        key = (row, layer)
                sources = [
                    self._random_source(name, f) if self.cfg.source == "random" else f
                    for name, f in named
                ]
                if not sources:
                    continue
                if key not in batches:
                    batches[key] = (layer, {}, {}, sources, labels)
                batches[key][1].setdefault(row, []).append(cid)
                batches[key][2][row] = self._pad(lf.a, lf.b)

        jobs = []
        per_target = self.cfg.self_transfer or self.cfg.source == "none"
        for key, (layer, members, factors, sources, labels) in batches.items():
            tok_key = key if per_target else key[0]
            padded = tuple(self._pad(a, b) for a, b in sources)
            if tok_key not in token_cache:
                token_cache[tok_key] = self._sources(padded)
            a = torch.stack([factors[r][0] for r in members])
            b = torch.stack([factors[r][1] for r in members])
            rows = tuple(tuple(ms) for ms in members.values())
            group = bank.get(rows[0][0]).group
            jobs.append(Job(layer, rows, a, b, token_cache[tok_key], group, tuple(labels), padded))
        return jobs

    def _row_chunks(self, rows: int, keep: bool) -> list[list[int]]:
        """How :meth:`generate` splits a job's ``rows`` targets into passes: ``chunk_size``
        at a time; in a round whose graph is not kept, the first ``diagnostic_rows`` (at most a
        chunk: the diagnostics' sample, when on) in a pass of their own."""
        sample = min(self.cfg.diagnostic_rows, self.cfg.chunk_size)
        if keep or not self.cfg.diagnostics or rows <= sample:
            return _chunks(range(rows), self.cfg.chunk_size)
        return [list(range(sample)), *_chunks(range(sample, rows), self.cfg.chunk_size)]

    def _pad(self, a: torch.Tensor, b: torch.Tensor) -> FactorPair:
        """Factors at the adapter's rank ``R`` (whole weights stay as they are)."""
        return (a, b) if self.full else pad_rank(a, b, self.rank)

    def _sources(self, padded: Sequence[FactorPair]) -> SourceTokens | WeightSources:
        """What the adapter reads of these (padded) source factors."""
        if self.full:
            return WeightSources.build(padded)
        return SourceTokens.build(padded, self.rank, self.cfg.adapter.max_source_tokens)

    def _shapes(self, jobs: Sequence[Job]) -> list:
        """The shapes :meth:`register_shapes` needs for ``jobs``."""
        if not self.full:
            return [(j.a.shape[1], j.b.shape[2]) for j in jobs] + [
                s for j in jobs for s in j.sources.shapes
            ]
        pairs = []
        for j in jobs:
            target = (j.a.shape[1], j.b.shape[2])
            pairs += [(target, s) for s in j.sources.shapes]
            if self.cfg.diagnostics:  # the counterfactual: the target attending to itself
                pairs.append((target, target))
        return pairs

    @contextmanager
    def _replayable(self, round: int, job: int, first_row: int) -> Iterator[None]:
        """A pass of the reference adapter (dropout) draws from a stream seeded by
        ``(adapter seed, round, job, first row)``: running it again draws the same masks."""
        if not self.full:
            yield
            return
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(
                zlib.crc32(f"{self.cfg.adapter.seed}:{round}:{job}:{first_row}".encode())
            )
            yield

    def _random_source(self, name: str, factors: FactorPair) -> FactorPair:
        """The fixed random stand-in for source ``name`` (``"<owner>/<layer>"``): factors of
        the shapes of ``factors`` whose product has the norm of theirs when first seen."""
        a, b = factors
        kept = self.random_sources.get(name)
        if kept is None or kept[0].shape != a.shape or kept[1].shape != b.shape:
            seed = zlib.crc32(name.encode()) + 7919 * self.cfg.adapter.seed
            generator = torch.Generator().manual_seed(seed)
            ra = torch.randn(a.shape, generator=generator, dtype=a.dtype)
            rb = torch.randn(b.shape, generator=generator, dtype=b.dtype)
            scale = (product_norm(a, b) / product_norm(ra, rb).clamp_min(1e-12)).sqrt()
            kept = self.random_sources[name] = (ra * scale, rb * scale)
        return kept

    def generate(
        self, bank: KnowledgeBank, targets: Sequence[str], round: int
    ) -> tuple[dict[str, dict[str, FactorPair]], Generation]:
        """Merged factors ``{client: {layer: (A': (m, R), B': (R, n))}}`` and their record.

        When the round's target rows fit in one chunk (``chunk_size``) the passes keep their
        autograd graph, so that :meth:`update` need not run them again, and the diagnostics
        wait for :meth:`Generation.measure`; a larger round measures them as it goes, on the
        first ``diagnostic_rows`` targets of each job (the diagnostics are read as group
        means), so that memory stays that of one chunk.
        """
        with torch.no_grad():
            jobs = self.plan(bank, targets)
        self.register_shapes(self._shapes(jobs))
        merged: dict[str, dict[str, FactorPair]] = {}
        pending: list[Callable[[], list[tuple[str, str, dict]]]] = []
        measured: dict[str, dict[str, dict]] = {}
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        keep = sum(len(job.members) for job in jobs) <= self.cfg.chunk_size
        memos: dict[int, KeyMemo] = {}  # per source set (jobs of one set share the object)
        for j, job in enumerate(jobs):
            sources = job.sources.to(self.device)
            memo = memos.setdefault(id(job.sources), KeyMemo())
            # the job's sources of its own group: built once, when first measured
            own = cache(partial(self._own_sources, job))
            for rows in self._row_chunks(len(job.members), keep):
                a, b = job.a[rows].to(self.device), job.b[rows].to(self.device)
                # a larger round measures the first chunk of each job: a sample of its targets
                diagnose = self.cfg.diagnostics and (keep or rows[0] == 0)
                with (
                    torch.set_grad_enabled(keep),
                    self.adapter.capturing(diagnose) as captured,
                    self._replayable(round, j, rows[0]),
                ):
                    out_a, out_b = self.adapter(a, b, sources, memo)
                if keep:
                    outputs[j] = (out_a, out_b)
                out_a, out_b = out_a.detach(), out_b.detach()
                if diagnose:
                    task = partial(self._diagnose, job, own, rows, a, b, out_a, out_b, captured)
                    if keep:
                        pending.append(task)
                    else:
                        _record(measured, task())
                for i, row in enumerate(rows):
                    for cid in job.members[row]:
                        merged.setdefault(cid, {})[job.layer] = (out_a[i].cpu(), out_b[i].cpu())
        version = self._version()
        return merged, Generation(round, tuple(jobs), outputs, version, pending, measured)

    def _own_sources(self, job: Job) -> SourceTokens | WeightSources | None:
        """What the adapter reads of the job's sources of its own group (None without any)."""
        own = [
            f for f, g in zip(job.source_factors, job.source_groups, strict=True) if g == job.group
        ]
        if not own:
            return None
        return self._sources(own).to(self.device)

    @torch.no_grad()
    def _diagnose(
        self,
        job: Job,
        own_sources: Callable[[], SourceTokens | None],
        rows: list[int],
        a: torch.Tensor,
        b: torch.Tensor,
        out_a: torch.Tensor,
        out_b: torch.Tensor,
        captured: dict,
    ) -> list[tuple[str, str, dict]]:
        """Per target row: ``transfer_effect`` = ‖merged − merged from its own group alone‖ /
        ‖its own low-rank part‖ (0 when the other groups change nothing), and the share of
        attention each source group received (in the pass that made ``out_a, out_b``, whose
        heads are ``captured``), for each of the row's clients.

        ``a: (N, m, R)``, ``b: (N, R, n)`` (the rows' targets), ``out_a``, ``out_b`` likewise;
        ``own_sources()``: :meth:`_own_sources` of the job.

        The reference adapter (whole weights, dropout) is measured without dropout, both
        passes; without sources of its own group its counterfactual is the target attending
        to itself alone, and the effect is relative to the generated weight (which replaces
        the target's).
        """
        groups = list(dict.fromkeys(job.source_groups))
        columns = torch.tensor([groups.index(g) for g in job.source_groups])
        shares = self.adapter.attention_shares(captured, job.sources, columns)  # (N, groups)
        own = own_sources()
        if self.full:
            with _evaluating(self.adapter):
                out_a, out_b = self.adapter(a, b, job.sources.to(self.device))
                if own is not None:
                    ref_a, ref_b = self.adapter(a, b, own)
                else:
                    alone = [
                        self.adapter(
                            a[i : i + 1], b[i : i + 1], WeightSources.build([(a[i], b[i])])
                        )
                        for i in range(len(rows))
                    ]
                    ref_a, ref_b = (torch.cat(parts) for parts in zip(*alone, strict=True))
            scale = product_norm(out_a, out_b)
        elif own is not None:
            ref_a, ref_b = self.adapter(a, b, own)
            scale = product_norm(a, b)
        else:  # no source of its own group: without the others the target keeps its factors
            ref_a, ref_b = a, b
            scale = product_norm(a, b)
        # A'B' − A_r B_r = [A', A' − A_r] [B' − B_r; B_r]: its norm from the factors, and
        # exactly 0 where the two passes agree
        moved = product_norm(
            torch.cat([out_a, out_a - ref_a], -1), torch.cat([out_b - ref_b, ref_b], -2)
        )
        effects = (moved / scale.clamp_min(1e-12)).tolist()
        attention = (
            [{} for _ in rows]
            if shares is None  # the mlp variant does not attend
            else [dict(zip(groups, row, strict=True)) for row in shares.tolist()]
        )
        out = []
        for i, row in enumerate(rows):
            stats = {"transfer_effect": effects[i], "attention": attention[i]}
            out += [(cid, job.layer, stats) for cid in job.members[row]]
        return out

    def update(
        self, generation: Generation, pieces: Mapping[str, Mapping[str, FactorPair]]
    ) -> dict[str, float]:
        """One optimiser step from the clients' gradient pieces; returns step statistics.

        Pieces must pass :meth:`Generation.check_pieces` (checked here before anything changes).
        Clients without pieces are left out of the sum. The members of a row got the same
        output, so their pieces are summed into one ``grad_outputs``.
        """
        for cid, p in pieces.items():
            generation.check_pieces(cid, p)
        generation.measure()  # before the step: the measurements need the adapter as it was
        params = [p for p in self.params if p.requires_grad]
        for p in params:
            p.grad = None
        # a graph from before a change to the parameters differentiates an adapter that is gone
        kept = dict(generation.outputs) if generation.adapter_version == self._version() else {}
        generation.outputs.clear()  # a graph is used once
        todo = []  # (job index, replied clients per row, rows that replied, G_A, G_B)
        for j, job in enumerate(generation.jobs):
            replied = [[c for c in ms if c in pieces] for ms in job.members]
            rows = [i for i, cs in enumerate(replied) if cs]
            if not rows:
                continue
            # per row its members' pieces summed (they got the same output); zero without replies
            grad_a, grad_b = (
                torch.stack([sum((pieces[c][job.layer][k] for c in cs), zero) for cs in replied])
                for k, zero in ((0, torch.zeros_like(job.a[0])), (1, torch.zeros_like(job.b[0])))
            )
            todo.append((j, replied, rows, grad_a.to(self.device), grad_b.to(self.device)))
        todo, scale = self._sample(generation.round, todo)
        # Kept graphs in one call (jobs of one source set share their key projections), and
        # first, so that they are freed before a recomputed pass builds its own. A call
        # accumulates into .grad of the parameters its passes used, and only those.
        from_kept = [t for t in todo if t[0] in kept]
        units: list[torch.Tensor] = []  # combine != "sum": each replying row's gradient
        reached: set[int] = set()  # the parameters those gradients reach
        if from_kept and self.cfg.combine == "sum":
            _backward(
                [out for j, *_ in from_kept for out in kept[j]],
                [g for *_, grad_a, grad_b in from_kept for g in (grad_a, grad_b)],
            )
        elif from_kept:
            for j, _, rows, grad_a, grad_b in from_kept:
                units += _row_gradients(kept[j], (grad_a, grad_b), rows, params, reached)
        used = sum(len(cs) for _, replied, *_ in from_kept for cs in replied)
        for j, replied, rows, grad_a, grad_b in todo:
            if j in kept:
                continue
            for chunk, out_a, out_b in self._passes(generation, j, rows):
                grads = (grad_a[chunk], grad_b[chunk])
                if self.cfg.combine == "sum":
                    _backward([out_a, out_b], list(grads))
                else:
                    mine = [k for k, i in enumerate(chunk) if replied[i]]
                    units += _row_gradients((out_a, out_b), grads, mine, params, reached)
                used += sum(len(replied[i]) for i in chunk)
        if units:
            robust = _robust(torch.stack(units), self.cfg.combine, self.cfg.trim)
            _set_gradient(params, robust, reached)
        if used == 0 or self.optimizer is None:
            for p in params:
                p.grad = None
            return {"pieces": 0, "grad_norm": 0.0}
        if scale != 1.0:  # a sample's sum, scaled to estimate every row's
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], scale)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm is not None else float("inf")
        # the total norm is non-finite exactly when some gradient entry is
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            log.warning("adapter step skipped: non-finite gradient from %d pieces", used)
            return {"pieces": float(used), "grad_norm": float("nan"), "skipped": 1.0}
        stepped = [p.detach() for p in params if p.grad is not None]  # all the step moves
        before = torch._foreach_mul(stepped, 1.0)  # a copy, in one call for hundreds of tensors
        lr = self.lr_at(self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        torch._foreach_sub_(before, stepped)
        step = float(torch.nn.utils.get_total_norm(before, foreach=True))
        log.debug("adapter step: %d pieces, gradient norm %.4g", used, norm)
        return {"pieces": float(used), "grad_norm": norm, "step_norm": step, "lr": lr}

    def _sample(self, round: int, todo: list[tuple]) -> tuple[list[tuple], float]:
        """``todo`` (job index, replied clients per row, replying rows, G_A, G_B) cut to at
        most ``update_rows`` replying rows, drawn uniformly over the round's (the others' pieces
        zeroed, their clients out of the count), and the factor that scales the sample's
        gradient to an estimate of all of them: replying rows / sampled rows."""
        total = sum(len(rows) for _, _, rows, *_ in todo)
        limit = self.cfg.update_rows
        if limit is None or total <= limit:
            return todo, 1.0
        seed = zlib.crc32(f"{self.cfg.adapter.seed}:{round}:update".encode())
        drawn = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:limit]
        keep, start, out = set(drawn.tolist()), 0, []
        for j, replied, rows, grad_a, grad_b in todo:
            mine = [r for k, r in enumerate(rows, start) if k in keep]
            start += len(rows)
            if not mine:
                continue
            chosen = set(mine)
            replied = [cs if i in chosen else [] for i, cs in enumerate(replied)]
            mask = torch.zeros(len(replied), dtype=torch.bool, device=grad_a.device)
            mask[mine] = True
            grad_a, grad_b = (g * mask.view(-1, 1, 1) for g in (grad_a, grad_b))
            out.append((j, replied, mine, grad_a, grad_b))
        return out, total / limit

    def _version(self) -> tuple[int, ...]:
        """Changes whenever a parameter is written in place (steps, loads) or one is added."""
        return tuple(p._version for p in self.params)

    def _passes(
        self, generation: Generation, j: int, rows: list[int]
    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """``(chunk, A', B')`` with their graph for ``rows`` of job ``j`` of ``generation``,
        lazily: one chunk's graph at a time. A target's output does not depend on the others
        in its pass, so the passes hold ``rows`` only, ``chunk_size`` at a time; the reference
        adapter's are :meth:`generate`'s chunks that hold one of them (the same chunks
        replay its dropout)."""
        job = generation.jobs[j]
        sources = job.sources.to(self.device)
        if self.full:
            keep = sum(len(other.members) for other in generation.jobs) <= self.cfg.chunk_size
            wanted = set(rows)
            chunks = [
                c for c in self._row_chunks(len(job.members), keep) if not wanted.isdisjoint(c)
            ]
        else:
            chunks = _chunks(sorted(rows), self.cfg.chunk_size)
        for chunk in chunks:
            a, b = job.a[chunk].to(self.device), job.b[chunk].to(self.device)
            with self._replayable(generation.round, j, chunk[0]):
                yield chunk, *self.adapter(a, b, sources)

    def state_dict(self) -> dict:
        """A snapshot (deep copy: the optimiser updates its state tensors in place)."""
        return copy.deepcopy(
            {
                "shapes": list(self.adapter.registered),
                "adapter": self.adapter.state_dict(),
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                "steps": self.steps,
                "random_sources": self.random_sources,
            }
        )

    def load_state_dict(self, state: dict) -> None:
        """Restore into a fresh :class:`Hypernetwork` built with the same config."""
        if self.adapter.registered:
            raise RuntimeError("load_state_dict needs a fresh Hypernetwork")
        self.register_shapes([_as_tuple(s) for s in state["shapes"]])
        self.adapter.load_state_dict(state["adapter"])
        if state["optimizer"] is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.steps = state.get("steps", 0)
        self.random_sources = copy.deepcopy(state.get("random_sources", {}))


def _row_gradients(
    outputs: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    rows: Sequence[int],
    params: list[torch.nn.Parameter],
    used: set[int],
) -> list[torch.Tensor]:
    """The adapter's gradient from each of ``rows`` alone: ``outputs`` ``(A', B')`` of ``N``
    rows with ``grads`` ``(G_A, G_B)`` of the same shapes -> one flat ``(P,)`` vector per row
    (the graph is kept for the next row); the indices of the parameters reached go to
    ``used``."""
    pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if o.requires_grad]
    out = []
    for i in rows:
        masked = []
        for _, g in pairs:
            only = torch.zeros_like(g)
            only[i] = g[i]
            masked.append(only)
        found = torch.autograd.grad(
            [o for o, _ in pairs], params, masked, retain_graph=True, allow_unused=True
        )
        used.update(k for k, f in enumerate(found) if f is not None)
        out.append(
            torch.cat(
                [
                    (f if f is not None else torch.zeros_like(p)).reshape(-1)
                    for f, p in zip(found, params, strict=True)
                ]
            )
        )
    return out


def _robust(units: torch.Tensor, how: str, trim: float) -> torch.Tensor:
    """``(U, P)`` per-row gradients -> ``(P,)``: their coordinate-wise median or trimmed
    mean, times ``U`` (the scale of their sum)."""
    if how == "median":
        middle = units.median(dim=0).values
    else:
        cut = int(trim * len(units))
        middle = units.sort(dim=0).values[cut : len(units) - cut].mean(dim=0)
    return middle * len(units)


def _set_gradient(params: list[torch.nn.Parameter], flat: torch.Tensor, used: set[int]) -> None:
    """Write ``flat`` ``(P,)`` into the ``.grad`` of ``params`` (in order) that a row
    reached (``used``); the others keep none, as after a plain backward pass."""
    offset = 0
    for k, p in enumerate(params):
        if k in used:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _backward(outputs: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """Backpropagate ``grads`` through the ``outputs`` that depend on the adapter (the
    reference adapter's ``A' = I`` does not)."""
    pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if o.requires_grad]
    torch.autograd.backward([o for o, _ in pairs], grad_tensors=[g for _, g in pairs])


@contextmanager
def _evaluating(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in eval mode (no dropout) inside, its own mode after."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


def _as_tuple(shape: object) -> object:
    """A saved shape (lists after a round trip) as the nested tuples the adapter keys by."""
    return tuple(_as_tuple(s) for s in shape) if isinstance(shape, (list, tuple)) else int(shape)


def _record(into: dict[str, dict[str, dict]], results: list[tuple[str, str, dict]]) -> None:
    for cid, layer, stats in results:
        into.setdefault(cid, {})[layer] = stats


def _chunks(rows: Sequence[int], size: int) -> list[list[int]]:
    rows = list(rows)
    return [rows[i : i + size] for i in range(0, len(rows), size)]
