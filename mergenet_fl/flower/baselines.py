"""Baselines that speak the same client protocol as MergeNet, for honest comparisons."""

from __future__ import annotations

from typing import Any

from mergenet_fl.flower.base import PeerStrategy


class LocalOnly(PeerStrategy):
    """No parameters travel: every client trains on its own data only."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(share="none", **kwargs)


class GroupFedAvg(PeerStrategy):
    """FedAvg of whole models inside each architecture group; groups learn nothing from
    each other."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(share="all", **kwargs)
