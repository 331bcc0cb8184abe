"""Robust statistics for what clients send: averages that one client cannot steer, and
screening against the others of a round.

An attacker among ``K`` clients moves a weighted mean as far as it likes; it moves a
coordinate-wise median or trimmed mean only within the spread of the honest values (for fewer
than half, resp. ``trim``, of the clients). Screening compares each client with the median of
its round, which a minority cannot move far either.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

AVERAGES = ("mean", "median", "trimmed")


def combine(
    values: Sequence[np.ndarray], weights: Sequence[float], how: str = "mean", trim: float = 0.2
) -> np.ndarray:
    """One array from ``K`` arrays of one shape: ``mean`` weighted by ``weights`` (``(K,)``,
    non-negative; uniform when they sum to 0), or, unweighted and per coordinate, ``median``
    or ``trimmed`` (the ``⌊trim·K⌋`` largest and smallest values dropped, the rest averaged).
    Computed in float64, returned in the dtype of ``values[0]``."""
    if how not in AVERAGES:
        raise ValueError(f"how={how!r}; choose one of {AVERAGES}")
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    stack = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    if how == "median":
        out = np.median(stack, axis=0)
    elif how == "trimmed":
        cut = int(trim * len(stack))
        ordered = np.sort(stack, axis=0)
        out = ordered[cut : len(stack) - cut].mean(axis=0)
    else:
        w = np.asarray(weights, dtype=np.float64).clip(min=0.0)
        w = w / w.sum() if w.sum() > 0 else np.full(len(stack), 1 / len(stack))
        out = np.tensordot(w, stack, axes=1)
    return out.astype(np.asarray(values[0]).dtype)


def above_median(norms: Sequence[float], factor: float, minimum: int = 3) -> list[bool]:
    """Which of ``norms`` exceed ``factor`` times their median (none with fewer than
    ``minimum`` values: a median of two is no reference)."""
    if len(norms) < minimum:
        return [False] * len(norms)
    limit = factor * float(np.median(norms))
    return [n > limit for n in norms]


def against_median(rows: Sequence[np.ndarray], minimum: int = 3) -> list[float]:
    """The cosine of each flattened array of ``rows`` with the coordinate-wise median of the
    others (1.0 each with fewer than ``minimum`` rows)."""
    if len(rows) < minimum:
        return [1.0] * len(rows)
    flat = np.stack([np.asarray(r, dtype=np.float64).ravel() for r in rows])
    out = []
    for i in range(len(flat)):
        median = np.median(np.delete(flat, i, axis=0), axis=0)
        denom = np.linalg.norm(flat[i]) * np.linalg.norm(median)
        out.append(float(flat[i] @ median / denom) if denom > 0 else 1.0)
    return out
