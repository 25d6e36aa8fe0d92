"""The resumable, sharded, seeded batch iterator that every data set shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

import numpy as np

from .errors import DataError
from .sharding import check_rank, epoch_order, shard

B = TypeVar("B")


class ShardedLoader(ABC, Generic[B]):
    """Batches of examples ``0..num_examples-1``, sharded by rank, reshuffled each epoch.

    Iterating yields batches until ``epochs`` epochs are done (forever when ``None``).
    ``state_dict()`` records the position; after ``load_state_dict`` the loader yields
    exactly what the uninterrupted loader would have yielded next. The order depends only
    on ``(seed, epoch)``, so a position is valid on any process with the same config.
    """

    def __init__(
        self,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        even_shards: bool = True,
        epochs: int | None = None,
    ) -> None:
        check_rank(rank, world_size)
        if batch_size < 1:
            raise DataError(f"batch_size: got {batch_size!r}; must be an integer >= 1")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.even_shards = even_shards
        self.epochs = epochs
        self.epoch = 0
        self.position = 0  # batches already yielded in the current epoch
        self._cached: tuple[int, np.ndarray] | None = None

    @abstractmethod
    def num_examples(self) -> int:
        """Examples in one epoch across all ranks."""

    @abstractmethod
    def fetch(self, indices: np.ndarray) -> B:
        """The batch made of the given example indices."""

    def indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's example indices for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self._cached is None or self._cached[0] != epoch:
            order = epoch_order(self.num_examples(), self.seed, epoch, self.shuffle)
            self._cached = (epoch, shard(order, self.rank, self.world_size, self.even_shards))
        return self._cached[1]

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        n = len(self.indices(0))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[B]:
        return self

    def __next__(self) -> B:
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        per_epoch = len(self)
        if per_epoch == 0:
            raise DataError(
                f"batch_size: got {self.batch_size}; rank {self.rank} of {self.world_size} has only "
                f"{len(self.indices(0))} examples per epoch, fewer than one batch"
            )
        if self.position >= per_epoch:
            self.epoch += 1
            self.position = 0
            if self.epochs is not None and self.epoch >= self.epochs:
                raise StopIteration
        start = self.position * self.batch_size
        batch = self.fetch(self.indices()[start : start + self.batch_size])
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The position (plus the settings it is only valid for)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_examples": self.num_examples(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from a :meth:`state_dict`; errors if it came from another setup."""
        for key in ("seed", "rank", "world_size", "num_examples"):
            mine = self.state_dict()[key] if key == "num_examples" else getattr(self, key)
            if key in state and state[key] != mine:
                raise DataError(
                    f"load_state_dict: state has {key}={state[key]!r} but this loader has {key}={mine!r}; "
                    "a position is only valid for the same data, seed and sharding"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
