"""The wire protocol shared by the strategies and the client helpers: record names and codecs.

Server -> client (``TRAIN``): ``config`` (ConfigRecord), and when there is something to send,
``merged`` (merged factors ``"<layer>/A"``, ``"<layer>/B"``) with ``own`` (the target
factors the adapter was given, which the client subtracts), ``group-arrays`` (the
architecture group's averaged parameters), and until a client's first train reply the
``initial-arrays`` given to ``start()`` (loaded by a client whose model they fit).

Client -> server: ``identity`` (ConfigRecord: ``client-id``, ``group``, ``send-only`` and the
packet ``manifest``), ``metrics`` (MetricRecord with ``num-examples``), and as asked:
``packet`` (its knowledge packet), ``pieces`` (hypernetwork gradient pieces), ``shared`` (the
parameters it shares with its group). A client sent ``initial-arrays`` reports in its metrics
``initial-arrays-loaded`` (1: they fit its model and were loaded, 0: they did not fit).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from mergenet_fl import PacketError, factorize_energy

CONFIG = "config"
MERGED = "merged"
OWN = "own"
GROUP_ARRAYS = "group-arrays"
INITIAL = "initial-arrays"
HEAD = "head"  # LG-FedAvg: the averaged head, "weight" and "bias"
PROTOS = "protos"  # FedProto: per-class mean features, "means" (C, d) and "counts" (C,)
LOGITS = "logits"  # FD: per-class mean logits, "means" (C, C) and "counts" (C,)
SHARED_MODEL = "shared-model"  # FML, FedKD: the shared model's floating state (FedKD: factors)
IDENTITY = "identity"
METRICS = "metrics"
PACKET = "packet"
PIECES = "pieces"
SHARED = "shared"

# Config keys the strategies set on every train message.
ROUND = "server-round"
SEND_PACKET = "send-packet"
SHARE = "share"
ADAPTER_RANK = "adapter-rank"
FULL_WEIGHTS = "full-weights"  # packets carry whole weights (the reference adapter's input)
ENERGY = "svd-energy"  # FedKD: share of the singular values' energy its factors keep
CLIENT_STATE_DIR = "client-state-dir"  # where clients keep their models across restarts
SHARE_MODES = ("none", "unselected", "all")
NUM_EXAMPLES = "num-examples"
INITIAL_LOADED = "initial-arrays-loaded"  # metric: 1 or 0


@dataclass(frozen=True)
class ClientIdentity:
    """Who a client is, independent of its Flower node id, and which group it belongs to."""

    client_id: str
    group: str
    send_only: bool = False

    def __post_init__(self) -> None:
        if not self.client_id or not self.group:
            raise ValueError("ClientIdentity needs a non-empty client_id and group")

    def to_record(self, manifest: str = "") -> ConfigRecord:
        return ConfigRecord(
            {
                "client-id": self.client_id,
                "group": self.group,
                "send-only": self.send_only,
                "manifest": manifest,
            }
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> tuple[ClientIdentity, str]:
        """The identity and packet manifest in a reply; :class:`PacketError` if malformed."""
        if IDENTITY not in content.config_records:
            raise PacketError("reply has no 'identity' record")
        rec = content.config_records[IDENTITY]
        cid, group = rec.get("client-id"), rec.get("group")
        send_only, manifest = rec.get("send-only", False), rec.get("manifest", "")
        if not isinstance(cid, str) or not cid or not isinstance(group, str) or not group:
            raise PacketError(f"reply identity has no valid client-id/group: {dict(rec)!r:.200}")
        if not isinstance(send_only, bool) or not isinstance(manifest, str):
            raise PacketError("reply identity has a malformed send-only or manifest field")
        return cls(cid, group, send_only), manifest


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """Flat named arrays -> ArrayRecord (names kept)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> flat named arrays; :class:`PacketError` if an array cannot be decoded."""
    out = {}
    for key in record:
        try:
            out[key] = record[key].numpy()
        except Exception as exc:  # a hostile payload can break deserialisation in many ways
            raise PacketError(f"array {key!r} cannot be decoded: {exc}") from None
    return out


def array_bytes(content: RecordDict) -> int:
    """Bytes of all arrays in a message's content."""
    return sum(rec.count_bytes() for rec in content.array_records.values())


def fits(state: Mapping[str, Any], model_state: Mapping[str, Any]) -> bool:
    """Whether named arrays (anything with a ``shape``: ndarrays, tensors, a record's arrays)
    can be loaded into a model with this ``state_dict()``: every name is one of its entries,
    with the same shape (a subset is fine, e.g. a shared backbone)."""
    return bool(state) and all(
        k in model_state and tuple(model_state[k].shape) == tuple(v.shape) for k, v in state.items()
    )


def group_state_dicts(arrays: ArrayRecord) -> dict[str, dict[str, torch.Tensor]]:
    """``Result.arrays`` of a strategy -> ``{group: state_dict}`` (names are split at their last
    ``/``: parameter names have none), e.g. ``Net().load_state_dict(out["net"], strict=False)``.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in from_record(arrays).items():
        group, _, name = key.rpartition("/")
        out.setdefault(group, {})[name] = torch.from_numpy(value.copy())
    return out


FACTOR_A, FACTOR_B = "@a", "@b"  # suffixes of a compressed matrix's factors (m, k), (k, n)


def compress_state(state: dict[str, np.ndarray], energy: float) -> dict[str, np.ndarray]:
    """FedKD's compression: each entry with two or more dimensions, as the matrix
    ``(shape[0], rest)``, becomes factors ``name@a (m, k)``, ``name@b (k, n)`` keeping
    ``energy`` of its singular values' energy (:func:`~mergenet_fl.factorize_energy`) — when
    that is smaller than the matrix; the others travel as they are."""
    out: dict[str, np.ndarray] = {}
    for name, value in state.items():
        matrix = value.reshape(value.shape[0], -1) if value.ndim >= 2 else None
        if matrix is None or min(matrix.shape) < 2:
            out[name] = value
            continue
        a, b = factorize_energy(torch.from_numpy(np.ascontiguousarray(matrix)), energy)
        m, n = matrix.shape
        if a.shape[1] * (m + n) >= m * n:  # factors would not be smaller
            out[name] = value
            continue
        out[name + FACTOR_A], out[name + FACTOR_B] = a.numpy(), b.numpy()
    return out


def recover_state(record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`compress_state` up to the truncation: factor pairs become their
    product ``(m, n)`` (the receiver reshapes it to its parameter); :class:`PacketError` for an
    unpaired or mismatched factor."""
    out: dict[str, np.ndarray] = {}
    for name, value in record.items():
        if name.endswith(FACTOR_B):
            continue
        if not name.endswith(FACTOR_A):
            out[name] = value
            continue
        base = name[: -len(FACTOR_A)]
        b = record.get(base + FACTOR_B)
        if b is None or value.ndim != 2 or b.ndim != 2 or value.shape[1] != b.shape[0]:
            raise PacketError(f"compressed {base!r}: factors missing or of mismatched shapes")
        out[base] = value @ b
    orphans = [n for n in record if n.endswith(FACTOR_B) and n[: -len(FACTOR_B)] not in out]
    if orphans:
        raise PacketError(f"compressed factors without their pair: {orphans}")
    return out
