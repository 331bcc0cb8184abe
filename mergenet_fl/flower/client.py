"""Client side of the protocol, for any ClientApp: a few calls around its own training.

.. code-block:: python

    @app.train()
    def train(msg, context):
        model = build_model()
        load_local_model(context, model)                     # the client keeps its own model
        installed = receive(msg, model, layers, rank=8)      # merged factors, group arrays
        metrics = my_training(model)                         # must include "num-examples"
        save_local_model(context, model)
        return reply(msg, model, layers, identity, installed, metrics, rank=8)

``layers`` is ``mergenet_fl.select_layers(model, spec)``; ``identity`` a
:class:`~mergenet_fl.flower.protocol.ClientIdentity`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from mergenet_fl import (
    FactorPair,
    InstalledLayer,
    PacketError,
    SelectedLayer,
    decode_factors,
    encode_factors,
    export_packet,
    gradient_pieces,
    install_merged,
)
from mergenet_fl.flower import protocol as p

MODEL_KEY = "mergenet.model"
MERGENET_SECONDS = "mergenet_seconds"


def has_local_model(context: Context, key: str = MODEL_KEY) -> bool:
    return key in context.state.array_records


def load_local_model(context: Context, model: nn.Module, key: str = MODEL_KEY) -> bool:
    """Restore the model this node trained in earlier rounds; False on the first round.
    ``key`` names another model the node keeps (e.g. a method's shared model)."""
    if not has_local_model(context, key):
        return False
    model.load_state_dict(context.state.array_records[key].to_torch_state_dict())
    return True


def save_local_model(context: Context, model: nn.Module, key: str = MODEL_KEY) -> None:
    """Keep the model in ``context.state`` (it persists per node for the whole run)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    context.state.array_records[key] = ArrayRecord(state)


def save_model_file(
    directory: str | os.PathLike,
    client_id: str,
    server_round: int,
    model: nn.Module,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Keep the model of ``server_round`` (and ``extra``: tensors, numbers, strings, bytes)
    on disk, atomically, and drop older rounds but one."""
    folder = Path(directory) / client_id
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{server_round}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "extra": dict(extra or {})}, tmp)
    os.replace(tmp, path)
    for old in folder.glob("round-*.pt"):
        if int(old.stem.split("-")[1]) < server_round - 1:
            old.unlink()


def load_model_file(
    directory: str | os.PathLike, client_id: str, server_round: int, model: nn.Module
) -> dict[str, Any] | None:
    """Restore the model a client saved after ``server_round`` and return its ``extra``;
    None if there is no such file."""
    path = Path(directory) / client_id / f"round-{server_round}.pt"
    if not path.is_file():
        return None
    saved = torch.load(path, weights_only=True)
    model.load_state_dict(saved["model"])
    return saved["extra"]


def shared_state(model: nn.Module, layers: Sequence[SelectedLayer], mode: str) -> dict:
    """The floating-point entries of ``model.state_dict()`` a client shares with its group.

    ``"all"``: every one; ``"unselected"``: all but the transfer layers' weights (they stay
    personal); ``"none"``.
    """
    if mode not in p.SHARE_MODES:
        raise ValueError(f"share mode {mode!r}; choose one of {p.SHARE_MODES}")
    if mode == "none":
        return {}
    skip = {f"{layer.name}.weight" for layer in layers} if mode == "unselected" else set()
    return {
        k: v.detach().cpu()
        for k, v in model.state_dict().items()
        if k not in skip and torch.is_floating_point(v)
    }


def receive(
    msg: Message, model: nn.Module, layers: Sequence[SelectedLayer], *, rank: int
) -> dict[str, InstalledLayer]:
    """Load the federation's initial arrays (the first time, where they fit this model), the
    group's averaged parameters, and install merged factors from a train message
    (:func:`load_group`, then :func:`install_factors`).

    Returns what :func:`reply` needs to compute the gradient pieces. Raises
    :class:`~mergenet_fl.PacketError` naming the problem if the message is malformed.
    """
    load_group(msg, model)
    return install_factors(msg, model, layers, rank=rank)


def load_group(msg: Message, model: nn.Module) -> None:
    """Every method's part of a train message: the federation's initial arrays (where they fit)
    and the group's averaged parameters."""
    content = msg.content
    if p.INITIAL in content.array_records:  # the federation's starting point, if it fits
        initial = p.from_record(content.array_records[p.INITIAL])
        if p.fits(initial, model.state_dict()):
            model.load_state_dict(
                {k: torch.from_numpy(v.copy()) for k, v in initial.items()}, strict=False
            )
    if p.GROUP_ARRAYS in content.array_records:
        group = content.array_records[p.GROUP_ARRAYS].to_torch_state_dict()
        own = model.state_dict()
        bad = [k for k, v in group.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise PacketError(f"group arrays do not fit this model: {bad[:5]}")
        model.load_state_dict(group, strict=False)


def install_factors(
    msg: Message, model: nn.Module, layers: Sequence[SelectedLayer], *, rank: int
) -> dict[str, InstalledLayer]:
    """MergeNet's part of a train message: install ``W + A'B' − AB`` with the merged factors
    ``A'B'`` and the own factors ``AB`` they replace (nothing when none came)."""
    content = msg.content
    if p.MERGED not in content.array_records:
        return {}
    if p.OWN not in content.array_records:
        raise PacketError("merged factors came without the own factors they replace")
    config = content.config_records.get(p.CONFIG, ConfigRecord())
    max_rank = int(config.get(p.ADAPTER_RANK, rank))
    shapes = {layer.name: layer.matrix_shape for layer in layers}
    factors = []
    for key, what in ((p.MERGED, "merged factors"), (p.OWN, "own factors")):
        arrays = p.from_record(content.array_records[key])
        names = {name.rsplit("/", 1)[0] for name in arrays}
        unknown = sorted(names - set(shapes))
        if unknown:
            raise PacketError(f"{what} for layers that are not selected: {unknown}")
        shape_of = {n: shapes[n] for n in names}
        factors.append(decode_factors(arrays, shape_of, max_rank=max_rank, what=what))
    merged, own = factors
    return install_merged(model, layers, merged, rank, own=own)


def knowledge_records(
    msg: Message,
    model: nn.Module,
    layers: Sequence[SelectedLayer],
    installed: Mapping[str, InstalledLayer],
    *,
    rank: int,
    pieces: Mapping[str, FactorPair] | None = None,
) -> tuple[dict[str, ArrayRecord], str]:
    """MergeNet's part of a train reply: the packet when the server asked for one, and the
    gradient pieces of the installed layers (``pieces``: measured earlier in the round, else
    now); with the packet's manifest ("" without one)."""
    config = msg.content.config_records.get(p.CONFIG, ConfigRecord())
    records: dict[str, ArrayRecord] = {}
    manifest = ""
    if config.get(p.SEND_PACKET, False):
        full = bool(config.get(p.FULL_WEIGHTS, False))  # the server's adapter decides
        arrays, manifest = export_packet(model, layers, rank, full=full).to_wire()
        records[p.PACKET] = p.to_record(arrays)
    if installed:
        if pieces is None:
            pieces = gradient_pieces(model, layers, installed)
        records[p.PIECES] = p.to_record(encode_factors(pieces))
    return records, manifest


def reply(
    msg: Message,
    model: nn.Module,
    layers: Sequence[SelectedLayer],
    identity: p.ClientIdentity,
    installed: Mapping[str, InstalledLayer],
    metrics: Mapping[str, float],
    *,
    rank: int,
    extra: Mapping[str, ArrayRecord] | None = None,
) -> Message:
    """The reply to a train message: metrics, and the packet, pieces and shared parameters
    the server asked for, with ``extra`` records (a method's client extension's).

    The time spent here is added to ``metrics["mergenet_seconds"]`` (pass the time of
    :func:`receive` there to report MergeNet's whole client-side overhead).
    """
    start = time.perf_counter()
    records, manifest = knowledge_records(msg, model, layers, installed, rank=rank)
    seconds = float(metrics.get(MERGENET_SECONDS, 0.0)) + time.perf_counter() - start
    return answer(
        msg,
        model,
        layers,
        identity,
        {**metrics, MERGENET_SECONDS: seconds},
        records={**(extra or {}), **records},
        manifest=manifest,
    )


def answer(
    msg: Message,
    model: nn.Module,
    layers: Sequence[SelectedLayer],
    identity: p.ClientIdentity,
    metrics: Mapping[str, float],
    *,
    records: Mapping[str, ArrayRecord],
    manifest: str = "",
) -> Message:
    """Every method's train reply: a method's ``records`` (and packet ``manifest``), the
    parameters the client shares with its group (``layers``: the transfer layers, kept
    personal with ``share=unselected``), its identity and ``metrics`` (which must include
    ``num-examples``; the time spent here is added to ``mergenet_seconds``)."""
    if p.NUM_EXAMPLES not in metrics:
        raise ValueError(f"metrics must include {p.NUM_EXAMPLES!r}")
    start = time.perf_counter()
    config = msg.content.config_records.get(p.CONFIG, ConfigRecord())
    content = RecordDict(dict(records))
    shared = shared_state(model, layers, str(config.get(p.SHARE, "none")))
    if shared:
        content[p.SHARED] = ArrayRecord(shared)
    content[p.IDENTITY] = identity.to_record(manifest)
    if p.INITIAL in msg.content.array_records:  # tell the server whether they fitted
        initial = dict(msg.content.array_records[p.INITIAL])  # names and shapes: no decoding
        metrics = {**metrics, p.INITIAL_LOADED: float(p.fits(initial, model.state_dict()))}
    overhead = float(metrics.get(MERGENET_SECONDS, 0.0)) + time.perf_counter() - start
    content[p.METRICS] = MetricRecord({**metrics, MERGENET_SECONDS: overhead})
    return Message(content, reply_to=msg)


def query_reply(msg: Message, identity: p.ClientIdentity) -> Message:
    """Answer the server's identity handshake."""
    return Message(RecordDict({p.IDENTITY: identity.to_record()}), reply_to=msg)


def evaluate_reply(
    msg: Message, identity: p.ClientIdentity, metrics: Mapping[str, float]
) -> Message:
    """The reply to an evaluate message (metrics must include ``num-examples``)."""
    if p.NUM_EXAMPLES not in metrics:
        raise ValueError(f"metrics must include {p.NUM_EXAMPLES!r}")
    content = RecordDict({p.METRICS: MetricRecord(dict(metrics)), p.IDENTITY: identity.to_record()})
    return Message(content, reply_to=msg)
