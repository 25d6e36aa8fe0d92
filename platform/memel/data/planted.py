"""Inputs with known (planted) features, to check that the Monosemantic Scale finds
feature-specific neurons.

* :class:`SparseFeatureLoader`: ``num_features`` fixed random unit directions in
  ``input_dim``-space (drawn from ``feature_seed``, the task, apart from the sampling seed, so
  runs of other seeds, and the held-out set every run is scored on, share the task); each sample switches each feature on with probability
  ``active_prob`` at a magnitude in [0.5, 1.5], sums the active directions and adds
  Gaussian noise. ``features`` ``[B, K]`` is the 0/1 matrix of active features.
* :class:`PlantedTextLoader`: byte passages labelled by source corpus (``shakespeare``,
  ``shakespeare-folio``, ``python-code``; see :mod:`memel.data.text_classification`),
  with ``features`` the one-hot ``[B, K]`` source matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .errors import DataError
from .loader import ShardedLoader
from .splits import SPLITS, check_split
from .text_classification import PassageLoader


class PlantedBatch(NamedTuple):
    """``inputs``; ``targets`` (float feature matrix, or class ids for text); ``features``
    int64 ``[B, K]`` 0/1 (row ``b`` column ``k`` = sample ``b`` carries feature ``k``)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    features: torch.Tensor


class SparseFeatureLoader(ShardedLoader[PlantedBatch]):
    """Sharded, seeded, resumable batches of sums of sparse planted feature directions."""

    def __init__(
        self,
        batch_size: int,
        *,
        num_features: int = 16,
        input_dim: int = 64,
        active_prob: float = 0.1,
        noise_std: float = 0.05,
        samples_per_epoch: int = 4096,
        split: str = "train",
        feature_seed: int | None = None,
        **loader: object,
    ) -> None:
        super().__init__(batch_size, **loader)  # type: ignore[arg-type]
        check_split(split)
        for field, value in (
            ("num_features", num_features),
            ("input_dim", input_dim),
            ("samples_per_epoch", samples_per_epoch),
        ):
            if value < 1:
                raise DataError(f"{field}: got {value!r}; must be an integer >= 1")
        if not 0.0 < active_prob <= 1.0:
            raise DataError(f"active_prob: got {active_prob!r}; must be in (0, 1]")
        self.num_features, self.input_dim = num_features, input_dim
        self.active_prob, self.noise_std = active_prob, noise_std
        self.samples_per_epoch = samples_per_epoch
        self.split_id = SPLITS.index(split)
        #: the seed of the feature directions (the task): ``feature_seed``, else the sampling seed
        self.feature_seed = self.seed if feature_seed is None else feature_seed
        rng = np.random.default_rng([self.feature_seed, 2**31 - 1])
        directions = rng.standard_normal((num_features, input_dim))
        self.directions = (directions / np.linalg.norm(directions, axis=1, keepdims=True)).astype(np.float32)

    def num_examples(self) -> int:
        return self.samples_per_epoch

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(input ``[D]``, active mask ``[K]``, magnitudes ``[K]``) of sample ``index``."""
        rng = np.random.default_rng([self.seed, self.split_id, index])
        active = rng.random(self.num_features) < self.active_prob
        magnitude = rng.uniform(0.5, 1.5, self.num_features) * active
        noise = self.noise_std * rng.standard_normal(self.input_dim)
        return (magnitude @ self.directions + noise).astype(np.float32), active, magnitude.astype(np.float32)

    def fetch(self, indices: np.ndarray) -> PlantedBatch:
        samples = [self.sample(int(i)) for i in indices]
        inputs = torch.from_numpy(np.stack([s[0] for s in samples]))
        features = torch.from_numpy(np.stack([s[1] for s in samples]).astype(np.int64))
        return PlantedBatch(inputs, features.float(), features)


class PlantedTextLoader(PassageLoader):
    """Source-labelled passages with the one-hot source matrix as ``features``."""

    def fetch(self, indices: np.ndarray) -> PlantedBatch:  # type: ignore[override]
        batch = super().fetch(indices)
        features = torch.nn.functional.one_hot(batch.targets, self.num_classes)
        return PlantedBatch(batch.inputs, batch.targets, features)
