"""Server checkpoints: the whole strategy state after a round, written atomically."""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class Checkpointer:
    """Saves ``{"round", "strategy", "rng"}`` to ``path`` after every round.

    The file is written beside ``path`` and renamed over it, so a crash mid-write leaves the
    previous checkpoint intact.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __call__(self, strategy: Stateful, server_round: int) -> None:
        state = {
            "version": FORMAT_VERSION,
            "round": server_round,
            "strategy": strategy.state_dict(),
            "rng": rng_state(),
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        log.info("round %d: checkpoint saved to %s", server_round, self.path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :class:`Checkpointer`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, weights_only=False, map_location="cpu")
    if state.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {state.get('version')!r}, expected {FORMAT_VERSION}"
        )
    return state
