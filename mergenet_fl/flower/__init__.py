"""Flower strategies for heterogeneous federations: MergeNet and its baselines (LocalOnly,
GroupFedAvg, and the field's LG-FedAvg, FedProto, FD, FML, FedKD, FedTGP and FedGH), on one
client protocol."""

from mergenet_fl.flower.base import ClientReply, PeerStrategy
from mergenet_fl.flower.baselines import GroupFedAvg, LocalOnly
from mergenet_fl.flower.fedproto import FD, FedProto
from mergenet_fl.flower.lgfedavg import LGFedAvg
from mergenet_fl.flower.mergenet import MergeNet
from mergenet_fl.flower.protocol import ClientIdentity, group_state_dicts
from mergenet_fl.flower.server_trained import FedGH, FedTGP
from mergenet_fl.flower.shared_model import FML, FedKD

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
