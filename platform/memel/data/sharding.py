"""Epoch permutations split across data-parallel ranks without overlap."""

from __future__ import annotations

import numpy as np


def check_rank(rank: int, world_size: int) -> None:
    """Raise a clear error unless ``0 <= rank < world_size``."""
    from .errors import DataError

    if not isinstance(world_size, int) or world_size < 1:
        raise DataError(f"world_size: got {world_size!r}; must be an integer >= 1")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise DataError(f"rank: got {rank!r}; must be an integer in [0, world_size={world_size})")


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Indices ``0..n-1`` in this epoch's order (a seeded permutation when ``shuffle``)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def shard(order: np.ndarray, rank: int, world_size: int, even: bool = True) -> np.ndarray:
    """Rank ``rank``'s share of ``order``: every ``world_size``-th index from ``rank``.

    Shares are disjoint and their union is ``order``; with ``even`` the last
    ``len(order) % world_size`` indices are dropped so every rank gets the same count
    (needed to keep collective operations in step).
    """
    if even:
        order = order[: len(order) - len(order) % world_size]
    return order[rank::world_size]
