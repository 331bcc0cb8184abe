"""Flower strategies for heterogeneous federations: MergeNet and its baselines (LocalOnly,
GroupFedAvg, and the field's LG-FedAvg, FedProto, FD, FML, FedKD, FedTGP and FedGH), on one
client protocol."""

from strategies.base import ClientReply, PeerStrategy
from strategies.baselines import GroupFedAvg, LocalOnly
from strategies.fedproto import FD, FedProto
from strategies.lgfedavg import LGFedAvg
from strategies.mergenet import MergeNet
from strategies.protocol import ClientIdentity, group_state_dicts
from strategies.server_trained import FedGH, FedTGP
from strategies.shared_model import FML, FedKD

__all__ = [
    "FD",
    "FML",
    "ClientIdentity",
    "ClientReply",
    "FedGH",
    "FedKD",
    "FedProto",
    "FedTGP",
    "GroupFedAvg",
    "LGFedAvg",
    "LocalOnly",
    "MergeNet",
    "PeerStrategy",
    "group_state_dicts",
]
