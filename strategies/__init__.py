"""Flower strategies for heterogeneous federations: MergeNet and its baselines (LocalOnly,
GroupFedAvg, and the field's LG-FedAvg, FedProto and FD), on one client protocol."""

from strategies.base import ClientReply, PeerStrategy
from strategies.baselines import GroupFedAvg, LocalOnly
from strategies.fedproto import FD, FedProto
from strategies.lgfedavg import LGFedAvg
from strategies.mergenet import MergeNet
from strategies.protocol import ClientIdentity, group_state_dicts

__all__ = [
    "FD",
    "ClientIdentity",
    "ClientReply",
    "FedProto",
    "GroupFedAvg",
    "LGFedAvg",
    "LocalOnly",
    "MergeNet",
    "PeerStrategy",
    "group_state_dicts",
]
