"""Flower strategies for heterogeneous federations: MergeNet and its baselines."""

from strategies.base import ClientReply, PeerStrategy
from strategies.baselines import GroupFedAvg, LocalOnly
from strategies.mergenet import MergeNet
from strategies.protocol import ClientIdentity

__all__ = ["ClientIdentity", "ClientReply", "GroupFedAvg", "LocalOnly", "MergeNet", "PeerStrategy"]
