"""Deterministic held-out splits by group (file) or by item (document, passage)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import DataError

SPLITS = ("train", "heldout")


def heldout_keys(keys: Sequence[str], fraction: float, seed: int, unit: str = "file") -> set[str]:
    """The keys held out: ``round(fraction * n)`` (at least 1 when ``fraction > 0``) distinct
    keys chosen by a seeded permutation of the sorted unique keys; the rest are training."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"heldout_fraction: got {fraction!r}; must be in [0, 1)")
    unique = sorted(set(keys))
    if fraction == 0.0:
        return set()
    if len(unique) < 2:
        raise DataError(
            f"heldout_fraction: got {fraction!r}; there is only {len(unique)} {unit}, so none can be "
            f"held out; use more {unit}s, another split_by, or heldout_fraction=0"
        )
    count = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    order = np.random.default_rng([seed, 7919]).permutation(len(unique))
    return {unique[i] for i in order[:count]}


def check_split(split: str) -> None:
    """Raise unless ``split`` is ``train`` or ``heldout``."""
    if split not in SPLITS:
        raise DataError(f"split: got {split!r}; allowed: {', '.join(SPLITS)}")
