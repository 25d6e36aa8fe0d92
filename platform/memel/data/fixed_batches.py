"""The same batches on every pass: a fixed choice of a loader's examples, spread evenly over its
epoch and dealt to data-parallel ranks without overlap (what every periodic evaluation scores).

The choice depends only on the loader's example count, the per-rank batch count, ``batch_size``
and ``world_size``: no position, no state, so a resumed run chooses the same examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

import numpy as np

from .errors import DataError
from .loader import ShardedLoader
from .sharding import shard

B = TypeVar("B")


def spread(num_examples: int, count: int) -> np.ndarray:
    """``min(count, num_examples)`` distinct indices evenly spaced over ``0..num_examples-1``, ascending."""
    count = min(count, num_examples)
    return (np.arange(count, dtype=np.int64) * num_examples) // max(count, 1)


class FixedBatches(Generic[B]):
    """``batches`` batches per rank of ``loader``'s examples, the same ones on every iteration.

    Across ranks the batches hold ``batches * batch_size * world_size`` examples spread evenly
    over the loader's epoch (its order ignored), each on one rank; when the epoch has fewer,
    all of them (less up to ``world_size - 1``, so every rank gets equally many).
    """

    def __init__(self, loader: ShardedLoader[B], batches: int) -> None:
        self.loader = loader
        world, total = loader.world_size, loader.num_examples()
        if total < world:
            raise DataError(f"world_size: got {world}; the data has only {total} examples, fewer than one per rank")
        chosen = spread(total, min(batches * loader.batch_size * world, total - total % world))
        self.indices = shard(chosen, loader.rank, world, even=False)  # this rank's examples, in batch order

    def __len__(self) -> int:
        return -(-len(self.indices) // self.loader.batch_size)

    def __iter__(self) -> Iterator[B]:
        size = self.loader.batch_size
        for start in range(0, len(self.indices), size):
            yield self.loader.fetch(self.indices[start : start + size])
