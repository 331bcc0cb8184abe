"""What every strategy of a heterogeneous federation shares: each client keeps its own model.

:class:`PeerStrategy` knows clients by the identity they report (not by Flower node id),
sends one message per node, validates every reply on its own (one bad reply is logged and
dropped, the round goes on), reports metrics per architecture group and overall, and can
average parameters inside each architecture group (``share``). Subclasses add what travels
besides (MergeNet: merged factors out, packets and gradient pieces back).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from mergenet_fl import PacketError
from mergenet_fl.flower import protocol as p
from mergenet_fl.flower.checkpoint import set_rng_state
from mergenet_fl.flower.logs import show_in_flower_log
from mergenet_fl.flower.polling import PromptGrid
from mergenet_fl.robust import combine

log = logging.getLogger(__name__)


class NotEnoughNodes(RuntimeError):
    """Fewer nodes than ``min_available_nodes`` connected within ``node_wait`` seconds."""


RoundSink = Callable[[dict[str, Any]], None]
"""Receives one record per round and stage (see :meth:`PeerStrategy._emit`)."""


@dataclass
class ClientReply:
    """A reply that passed the checks so far."""

    node_id: int
    identity: p.ClientIdentity
    manifest: str
    metrics: dict[str, float]
    content: RecordDict
    bytes_up: int
    series: dict[str, list[float]] = field(default_factory=dict)  # list-valued metrics
    shared: dict[str, np.ndarray] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


class PeerStrategy(Strategy):
    """Base of the strategies: identities, per-node messages, validation, group metrics.

    Parameters
    ----------
    share:
        ``"none"``, ``"unselected"`` (FedAvg of everything but the transfer layers inside each
        architecture group) or ``"all"`` (FedAvg of the whole model inside each group).
    fraction_train, min_train_nodes, fraction_evaluate, min_evaluate_nodes, min_available_nodes:
        Node sampling, as in Flower's FedAvg.
    evaluate_every:
        Evaluate every this many rounds, and always in the last round.
    query_timeout:
        Seconds to wait for unknown nodes to answer the identity handshake.
    node_wait:
        Seconds to wait for ``min_available_nodes`` before the first round; then
        :class:`NotEnoughNodes` is raised (``None``: wait for ever).
    on_round:
        Called with one record per round and stage (e.g. to write JSON lines).
    on_round_end:
        Called with the strategy and the round number once a round (train and evaluate) is
        complete, e.g. a :class:`~mergenet_fl.flower.checkpoint.Checkpointer`.
    seed:
        Seeds client sampling (with the round), so that strategies compared on one seed train
        and evaluate the same clients in every round.
    average, trim:
        How a group's shared parameters are combined: ``mean`` (FedAvg, weighted by
        examples), or per coordinate ``median`` or ``trimmed`` (``trim`` of the members
        dropped at each end), which a minority of attackers cannot steer.
    """

    def __init__(
        self,
        *,
        share: str = "none",
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        fraction_evaluate: float = 1.0,
        min_evaluate_nodes: int = 1,
        min_available_nodes: int = 1,
        evaluate_every: int = 1,
        query_timeout: float = 60.0,
        node_wait: float | None = None,
        on_round: RoundSink | None = None,
        on_round_end: Callable[[PeerStrategy, int], None] | None = None,
        seed: int = 0,
        average: str = "mean",
        trim: float = 0.2,
    ) -> None:
        if share not in p.SHARE_MODES:
            raise ValueError(f"share={share!r}; choose one of {p.SHARE_MODES}")
        combine([np.zeros(1)], [1.0], average, trim)  # checks both, naming the problem
        for name, value in (
            ("fraction_train", fraction_train),
            ("fraction_evaluate", fraction_evaluate),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name, value in (
            ("min_train_nodes", min_train_nodes),
            ("min_evaluate_nodes", min_evaluate_nodes),
            ("min_available_nodes", min_available_nodes),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if evaluate_every < 1:
            raise ValueError(f"evaluate_every must be >= 1, got {evaluate_every}")
        if node_wait is not None and not node_wait > 0:
            raise ValueError(f"node_wait must be > 0 or None, got {node_wait}")
        show_in_flower_log()  # a plain Flower app shows this strategy's INFO lines
        self.share = share
        self.fraction_train, self.min_train_nodes = fraction_train, min_train_nodes
        self.fraction_evaluate, self.min_evaluate_nodes = fraction_evaluate, min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.evaluate_every = evaluate_every
        self.query_timeout = query_timeout
        self.node_wait = node_wait
        self.last_round: int | None = None  # set by start()
        self._evaluating = False
        self._stage_start = 0.0
        self._configure_seconds = 0.0  # the server's own work before the messages go out
        self.on_round = on_round
        self.on_round_end = on_round_end
        self.seed = seed
        self.average, self.trim = average, trim
        self.round_offset = 0  # rounds completed before a resume
        self._quorum = False  # min_available_nodes were connected once
        self._absent: list[str] = []  # known clients that are no longer connected
        self.identities: dict[int, p.ClientIdentity] = {}  # Flower node id -> client
        self.group_arrays: dict[str, dict[str, np.ndarray]] = {}
        self.initial: dict[str, np.ndarray] = {}  # start()'s initial_arrays
        self._started: set[str] = set()  # clients that answered a train message
        self._initial_fit: dict[str, bool] = {}  # group -> whether initial_arrays fit it
        self._bytes_down: dict[int, int] = {}
        self._sampled: list[int] = []

    # ----------------------------------------------------------------- hooks for subclasses
    def train_config(self, server_round: int) -> dict[str, Any]:
        """Extra config entries for every train message of this round."""
        return {p.SEND_PACKET: False}

    def train_records(
        self, server_round: int, identities: dict[int, p.ClientIdentity]
    ) -> dict[int, dict[str, ArrayRecord]]:
        """Extra array records per node for this round's train messages."""
        return {}

    def evaluate_records(
        self, server_round: int, identities: dict[int, p.ClientIdentity]
    ) -> dict[int, dict[str, ArrayRecord]]:
        """Extra array records per node for this round's evaluate messages: what the method
        scores its clients with (LG-FedAvg's and FedGH's head, the global prototypes)."""
        return {}

    def validate(self, server_round: int, reply: ClientReply) -> None:
        """Decode and check what the subclass needs from a reply (into ``reply.extras``).

        Raise :class:`~mergenet_fl.PacketError` to drop the client for this round.
        """

    def absorb(self, server_round: int, replies: list[ClientReply]) -> dict[str, Any]:
        """Use the validated replies; return a record for the round log."""
        return {}

    def while_waiting(self) -> None:
        """Work that needs no replies, run once a stage's messages are out (on Flower's
        grids), while the clients work. What it skips must happen later anyway."""

    # ----------------------------------------------------------------- Flower hooks
    def summary(self) -> None:
        log.info("\t├──> %s: share=%s", type(self).__name__, self.share)
        log.info(
            "\t└──> Sampling: fraction train %.2f / evaluate %.2f, min nodes %d / %d, "
            "min available %d",
            self.fraction_train,
            self.fraction_evaluate,
            self.min_train_nodes,
            self.min_evaluate_nodes,
            self.min_available_nodes,
        )

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's loop, with its arguments made meaningful for a heterogeneous federation.

        ``initial_arrays``: the starting point of every client whose model they fit (same
        parameter names and shapes, or a subset of them), loaded before its first training;
        each group is told in the log whether they fitted its model. ``evaluate_fn``: called
        with ``initial_arrays`` at round 0 (when given), then once per architecture group with
        the group's averaged model (``share="all"`` only), its metrics named
        ``"<group>/<metric>"``; a group it cannot evaluate is warned about once and skipped.
        ``Result.arrays``: every group's averaged parameters as ``"<group>/<name>"``
        (:func:`~mergenet_fl.flower.protocol.group_state_dicts` splits them), empty with
        ``share="none"``, where each model stays on its client.
        """
        self.last_round = self.round_offset + num_rounds
        self.initial = p.from_record(initial_arrays) if len(initial_arrays) else {}
        if evaluate_fn is not None and self.share != "all":
            log.warning(
                "evaluate_fn is called once per architecture group with the group's averaged "
                "model, which exists only with share='all' (here share=%r): it will not be "
                "called after round 0. Evaluate on the clients instead (their evaluate replies)",
                self.share,
            )
        log.info(
            "Result.arrays will hold %s",
            "nothing: with share='none' each model stays on its client (save it there, e.g. "
            "with mergenet_fl.flower.client.save_model_file)"
            if self.share == "none"
            else "each architecture group's averaged parameters as '<group>/<name>' "
            "(mergenet_fl.flower.group_state_dicts splits them)",
        )
        if isinstance(grid, Grid):  # Flower's grids pull replies every 0.1 s (3 s deployed)
            grid = PromptGrid(grid, self.while_waiting)
        return super().start(
            grid,
            initial_arrays,
            num_rounds,
            timeout,
            train_config,
            evaluate_config,
            None if evaluate_fn is None else self._per_group(evaluate_fn),
        )

    def _per_group(
        self, evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None]
    ) -> Callable[[int, ArrayRecord], MetricRecord | None]:
        """``evaluate_fn`` on ``initial_arrays`` at round 0, then on each group's model."""
        skipped: set[str] = set()  # groups the function failed on

        def call(server_round: int, arrays: ArrayRecord, group: str) -> MetricRecord | None:
            try:
                return evaluate_fn(server_round, arrays)
            except Exception as exc:  # the user's function; a failure must not end the run
                what = f"group {group!r}" if group else "the initial arrays"
                log.warning(
                    "evaluate_fn cannot evaluate %s (%s: %s); it is skipped from now on",
                    what,
                    type(exc).__name__,
                    exc,
                )
                skipped.add(group)
                return None

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return call(0, arrays, "") if self.initial else None
            if self.share != "all":
                return None
            out: dict[str, Any] = {}
            for group, state in sorted(self.group_arrays.items()):
                if group not in skipped:
                    res = call(server_round + self.round_offset, p.to_record(state), group)
                    out.update({f"{group}/{k}": v for k, v in (res or {}).items()})
            return MetricRecord(out) if out else None

        return evaluate

    def evaluates(self, server_round: int) -> bool:
        """Whether ``server_round`` (the run's numbering) has an evaluation stage."""
        return server_round % self.evaluate_every == 0 or server_round == self.last_round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes, server_round)
        self._stage_start = time.time()
        self._sampled = nodes
        known = {nid: self.identities[nid] for nid in nodes if nid in self.identities}
        extras = self.train_records(server_round, known)
        base = {**dict(config), **self.train_config(server_round), p.ROUND: server_round}
        sizes = Counter(i.group for i in self.identities.values())
        messages = []
        for nid in nodes:
            group = known[nid].group if nid in known else None
            # Averaging inside a group of one would only send a model back and forth.
            share = self.share if sizes[group] > 1 else "none"
            config_record = ConfigRecord({**base, p.SHARE: share})  # a new record per node
            content = RecordDict({p.CONFIG: config_record})
            for key, record in extras.get(nid, {}).items():
                content[key] = record
            if share != "none" and group in self.group_arrays:
                content[p.GROUP_ARRAYS] = p.to_record(self.group_arrays[group])
            if self.initial and (nid not in known or known[nid].client_id not in self._started):
                content[p.INITIAL] = p.to_record(self.initial)
            self._bytes_down[nid] = p.array_bytes(content)
            messages.append(Message(content, dst_node_id=nid, message_type=MessageType.TRAIN))
        self._configure_seconds = time.time() - self._stage_start
        log.info("configure_train: round %d, %d nodes", server_round, len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        started = time.time()
        accepted, dropped = self._parse(replies)
        self._note_started(accepted)
        valid = []
        for reply in accepted:
            try:
                reply.shared = self._check_shared(reply, valid)
                self.validate(server_round, reply)
            except PacketError as exc:
                dropped[reply.identity.client_id] = str(exc)
                log.warning(
                    "round %d: dropped client %r: %s", server_round, reply.identity.client_id, exc
                )
                continue
            valid.append(reply)
        server = self.absorb(server_round, valid)
        self._average_groups(valid)
        server["aggregate_seconds"] = time.time() - started
        metrics = self._emit(server_round, "train", valid, dropped, server)
        return (self.result_arrays() if server_round == self.last_round else None), metrics

    def result_arrays(self) -> ArrayRecord | None:
        """Every group's averaged parameters, ``"<group>/<name>"`` (None when none are)."""
        if not self.group_arrays:
            return None
        return p.to_record(
            {
                f"{g}/{k}": v
                for g, state in sorted(self.group_arrays.items())
                for k, v in state.items()
            }
        )

    def _note_started(self, replies: list[ClientReply]) -> None:
        """Clients that answered a train message have a model: no more initial arrays. Say
        once per group whether the initial arrays fitted its model."""
        for reply in replies:
            self._started.add(reply.identity.client_id)
            loaded, group = reply.metrics.get(p.INITIAL_LOADED), reply.identity.group
            if loaded is None or group in self._initial_fit:
                continue
            self._initial_fit[group] = loaded > 0
            if loaded > 0:
                log.info("group %r starts from the initial arrays", group)
            else:
                log.warning(
                    "the initial arrays do not fit group %r's model (other parameter names or "
                    "shapes): its clients start from their own initialisation. Pass that "
                    "model's state_dict, or an empty ArrayRecord",
                    group,
                )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        self._evaluating = self.fraction_evaluate > 0.0 and self.evaluates(server_round)
        if not self._evaluating:
            self._sampled = []
            return []
        nodes = self._sample(
            grid, self.fraction_evaluate, self.min_evaluate_nodes, server_round, "evaluate"
        )
        self._stage_start = time.time()
        base = {**dict(config), p.ROUND: server_round}
        self._sampled = nodes
        known = {nid: self.identities[nid] for nid in nodes if nid in self.identities}
        extras = self.evaluate_records(server_round, known)
        messages = []
        for nid in nodes:
            content = RecordDict({p.CONFIG: ConfigRecord(dict(base))})
            for key, record in extras.get(nid, {}).items():
                content[key] = record
            self._bytes_down[nid] = p.array_bytes(content)
            messages.append(Message(content, dst_node_id=nid, message_type=MessageType.EVALUATE))
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round += self.round_offset
        metrics = None
        if self._evaluating:
            accepted, dropped = self._parse(replies)
            metrics = self._emit(server_round, "evaluate", accepted, dropped, {})
        if self.on_round_end is not None:
            self.on_round_end(self, server_round)
        return metrics

    def resume(self, checkpoint: dict[str, Any]) -> None:
        """Continue after the round a :class:`~mergenet_fl.flower.checkpoint.Checkpointer` saved.

        ``start(num_rounds=N)`` then runs rounds ``checkpoint["round"] + 1`` onwards (Flower's
        own log counts from 1; this strategy's records use the run's round numbers).
        """
        self.load_state_dict(checkpoint["strategy"])
        set_rng_state(checkpoint["rng"])
        self.round_offset = checkpoint["round"]
        log.info("resuming after round %d", self.round_offset)

    # ----------------------------------------------------------------- internals
    def _sample(
        self, grid: Grid, fraction: float, minimum: int, server_round: int, stage: str = "train"
    ) -> list[int]:
        """Sample nodes by client identity, with an RNG seeded by ``(seed, round, stage)``: the
        same seed samples the same clients for every strategy. At the start wait for
        ``min_available_nodes``; later rounds go on with whoever is connected (clients leave;
        the run must not hang)."""
        waited = time.monotonic()
        while True:
            nodes = list(grid.get_node_ids())
            wanted = max(minimum, 1) if self._quorum else self.min_available_nodes
            if len(nodes) >= max(wanted, 1):
                break
            if self.node_wait is not None and time.monotonic() - waited > self.node_wait:
                raise NotEnoughNodes(
                    f"{len(nodes)} of the {wanted} nodes this federation needs connected "
                    f"within {self.node_wait:g} s"
                )
            log.info("waiting for nodes: %d connected, %d wanted", len(nodes), wanted)
            time.sleep(1.0)
        self._quorum = True
        known = {i.client_id for nid, i in self.identities.items() if nid in nodes}
        self._absent = sorted({i.client_id for i in self.identities.values()} - known)
        if self._absent:
            log.info("clients not connected: %s", self._absent)
        self._learn_identities(grid, nodes)
        size = min(len(nodes), max(int(len(nodes) * fraction), minimum))
        by_client = sorted(nodes, key=lambda nid: (nid not in self.identities, self._label(nid)))
        rng = random.Random(f"{self.seed}/{server_round}/{stage}")
        return sorted(rng.sample(by_client, size))

    def _learn_identities(self, grid: Grid, nodes: list[int]) -> None:
        """Ask nodes we have not heard from who they are (QUERY handshake)."""
        unknown = [nid for nid in nodes if nid not in self.identities]
        if not unknown:
            return
        queries = [
            Message(
                RecordDict({p.CONFIG: ConfigRecord()}),
                dst_node_id=nid,
                message_type=MessageType.QUERY,
            )
            for nid in unknown
        ]
        for msg in grid.send_and_receive(queries, timeout=self.query_timeout):
            if msg.has_error():
                log.warning(
                    "identity query to node %d failed: %s",
                    msg.metadata.src_node_id,
                    msg.error.reason,
                )
                continue
            try:
                identity, _ = p.ClientIdentity.from_content(msg.content)
                self._check_claim(msg.metadata.src_node_id, identity)
            except PacketError as exc:
                log.warning(
                    "node %d answered the identity query badly: %s", msg.metadata.src_node_id, exc
                )
                continue
            self._remember(msg.metadata.src_node_id, identity)

    def _check_claim(self, node_id: int, identity: p.ClientIdentity) -> None:
        """Refuse a node that changes its identity, or claims one a live node holds."""
        known = self.identities.get(node_id)
        if known is not None and known != identity:
            raise PacketError(f"node {node_id} is {known} but now claims to be {identity}")
        for nid, other in self.identities.items():
            if nid != node_id and other.client_id == identity.client_id and nid in self._sampled:
                raise PacketError(
                    f"node {node_id} claims to be {identity.client_id!r}, which node {nid} is"
                )

    def _remember(self, node_id: int, identity: p.ClientIdentity) -> None:
        # A client that reconnects comes back under a new node id: forget the old one.
        for nid, known in list(self.identities.items()):
            if known.client_id == identity.client_id and nid != node_id:
                log.info(
                    "client %r moved from node %d to node %d", identity.client_id, nid, node_id
                )
                del self.identities[nid]
        self.identities[node_id] = identity

    def _parse(self, replies: Iterable[Message]) -> tuple[list[ClientReply], dict[str, str]]:
        """Identity and metrics of each reply; errors and malformed replies are dropped."""
        accepted: list[ClientReply] = []
        dropped: dict[str, str] = {}
        seen: set[str] = set()
        replied: set[int] = set()
        for msg in replies:
            nid = msg.metadata.src_node_id
            replied.add(nid)
            label = self._label(nid)
            if msg.has_error():
                cause = error_cause(msg.error.reason)
                dropped[label] = f"error reply: {cause}"
                log.warning("client %s failed: %s", label, cause)
                continue
            try:
                identity, manifest = p.ClientIdentity.from_content(msg.content)
                self._check_claim(nid, identity)
                if identity.client_id in seen:
                    raise PacketError(f"a second reply claims to be {identity.client_id!r}")
                metrics, series = _parse_metrics(msg.content)
            except PacketError as exc:
                dropped[label] = str(exc)
                log.warning("dropped reply of %s: %s", label, exc)
                continue
            seen.add(identity.client_id)
            self._remember(nid, identity)
            accepted.append(
                ClientReply(
                    nid,
                    identity,
                    manifest,
                    metrics,
                    msg.content,
                    p.array_bytes(msg.content),
                    series,
                )
            )
        for nid in self._sampled:
            if nid not in replied and (label := self._label(nid)) not in dropped:
                dropped[label] = "no reply (timeout or disconnected)"
                log.warning("no reply from %s", label)
        return accepted, dropped

    def _label(self, node_id: int) -> str:
        return (
            self.identities[node_id].client_id if node_id in self.identities else f"node {node_id}"
        )

    def _check_shared(self, reply: ClientReply, others: list[ClientReply]) -> dict[str, np.ndarray]:
        """The parameters a client shares with its group, checked against its group's."""
        if p.SHARED not in reply.content.array_records:
            return {}
        if self.share == "none":
            raise PacketError("reply has shared parameters, but nothing is shared")
        shared = p.from_record(reply.content.array_records[p.SHARED])
        reference = next(
            (o.shared for o in others if o.identity.group == reply.identity.group),
            self.group_arrays.get(reply.identity.group),
        )
        if reference is not None:
            if set(shared) != set(reference):
                diff = sorted(set(shared) ^ set(reference))[:5]
                raise PacketError(f"shared parameters differ from the group's: {diff}")
            bad = [k for k, v in shared.items() if v.shape != reference[k].shape]
            if bad:
                raise PacketError(f"shared parameters with wrong shapes: {bad[:5]}")
        for key, value in shared.items():
            if value.dtype.kind != "f" or not np.isfinite(value).all():
                raise PacketError(f"shared parameter {key!r} is not finite floating point")
        return shared

    def _average_groups(self, replies: list[ClientReply]) -> None:
        """FedAvg inside each architecture group, weighted by examples; or, with ``average``
        ``median`` or ``trimmed``, a coordinate-wise robust average (unweighted) that a
        minority of the group cannot steer (:func:`mergenet_fl.robust.combine`)."""
        by_group: dict[str, list[ClientReply]] = {}
        for reply in replies:
            if reply.shared:
                by_group.setdefault(reply.identity.group, []).append(reply)
        for group, members in by_group.items():
            weights = [max(r.metrics[p.NUM_EXAMPLES], 0.0) for r in members]
            self.group_arrays[group] = {
                key: combine([r.shared[key] for r in members], weights, self.average, self.trim)
                for key in members[0].shared
            }

    def _emit(
        self,
        server_round: int,
        stage: str,
        replies: list[ClientReply],
        dropped: dict[str, str],
        server: dict[str, Any],
    ) -> MetricRecord | None:
        """Metrics per group and overall (example-weighted), and one record to the sink.

        The record's ``server`` entry carries the stage's wall-clock span (``stage_start``,
        ``stage_end``: seconds since the epoch, from sampling the nodes to this call) and the
        server's own work before the messages went out (``configure_seconds``).
        """
        server = {
            **server,
            "stage_start": self._stage_start,
            "stage_end": time.time(),
            "configure_seconds": self._configure_seconds if stage == "train" else 0.0,
        }
        clients = {
            r.identity.client_id: {
                "group": r.identity.group,
                **r.metrics,
                **r.series,
                "bytes_down": self._bytes_down.get(r.node_id, 0),
                "bytes_up": r.bytes_up,
            }
            for r in replies
        }
        if self.on_round is not None:
            self.on_round(
                {
                    "round": server_round,
                    "stage": stage,
                    "clients": clients,
                    "dropped": dropped,
                    "dropped_groups": {
                        i.client_id: i.group
                        for i in self.identities.values()
                        if i.client_id in dropped
                    },
                    "absent": self._absent,
                    "server": server,
                    # the run's last record: its last round's evaluation (or training)
                    "final": server_round == self.last_round
                    and (stage == "evaluate" or self.fraction_evaluate == 0.0),
                }
            )
        if not replies:
            return None
        out: dict[str, float] = {}
        groups = sorted({r.identity.group for r in replies})
        for prefix, members in [("", replies)] + [
            (f"{g}/", [r for r in replies if r.identity.group == g]) for g in groups
        ]:
            out.update({prefix + k: v for k, v in _weighted(members).items()})
        out["bytes"] = float(sum(c["bytes_down"] + c["bytes_up"] for c in clients.values()))
        return MetricRecord(out)

    def state_dict(self) -> dict[str, Any]:
        """Strategy state that outlives a round (to save and restore a run)."""
        return {
            "group_arrays": self.group_arrays,
            "started": sorted(self._started),
            "initial_fit": dict(self._initial_fit),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.group_arrays = state["group_arrays"]
        self._started = set(state.get("started", ()))  # checkpoints older than initial arrays
        self._initial_fit = dict(state.get("initial_fit", {}))


def error_cause(reason: str) -> str:
    """The cause in an error reply's reason, on one line.

    Flower wraps a ClientApp's exception as ``"<class '...ClientAppException'>:<'\\nException
    ClientAppException occurred. Message: <the exception's text>'>"``; keep the text.
    """
    text = reason.split("Message:", 1)[1] if "Message:" in reason else reason
    text = text.strip().removesuffix("'>").strip()
    return " ".join(text.split()) or reason


def _parse_metrics(content: RecordDict) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Finite numbers, and lists of at most 1000 finite numbers (e.g. label counts)."""
    if p.METRICS not in content.metric_records:
        raise PacketError("reply has no 'metrics' record")
    metrics, series = {}, {}
    for key, value in content.metric_records[p.METRICS].items():
        if _finite(value):
            metrics[key] = float(value)
        elif isinstance(value, list) and len(value) <= 1000 and all(map(_finite, value)):
            series[key] = [float(v) if isinstance(v, float) else v for v in value]
    if metrics.get(p.NUM_EXAMPLES, -1) < 0:
        raise PacketError(f"reply metrics have no valid {p.NUM_EXAMPLES!r}")
    return metrics, series


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _weighted(replies: list[ClientReply]) -> dict[str, float]:
    """Example-weighted mean of every metric the replies share; ``num-examples`` is summed."""
    total = sum(r.metrics[p.NUM_EXAMPLES] for r in replies)
    keys = set.intersection(*(set(r.metrics) for r in replies)) - {p.NUM_EXAMPLES}
    out = {p.NUM_EXAMPLES: total}
    for key in sorted(keys):
        if total > 0:
            out[key] = sum(r.metrics[key] * r.metrics[p.NUM_EXAMPLES] for r in replies) / total
        else:
            out[key] = sum(r.metrics[key] for r in replies) / len(replies)
    return out
