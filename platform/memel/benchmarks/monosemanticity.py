"""Calibration of the monosemantic ratio: false positives on featureless neurons, detection of planted ones.

Every number comes from the real recording path: activations go through a real
:class:`memel.Inhibitor` in mode ``original`` (statistics, forget step and MS exactly as in
training, nothing modified) with ``ms_threshold`` = the criterion's threshold, one snapshot every
``batches_per_snapshot`` batches; a neuron is flagged at a snapshot when its ``frac_above`` reaches
the criterion's ``min_fraction`` (as ``memel analyze`` counts it), and a snapshot counts only when
it has at least :meth:`Criterion.min_samples` samples.

Sources (``neurons`` neurons each):

* featureless: ``gaussian``, ``gelu``, ``relu``, ``silu`` of i.i.d. N(0, 1) values;
* ``planted p=...``: one neuron per planted feature of :class:`memel.data.planted.SparseFeatureLoader`
  (feature active with probability p at a magnitude in [0.5, 1.5], inputs = the sum of the active
  unit directions in 1024 dimensions, nearly orthogonal, plus N(0, 0.05^2) noise), read as ReLU(direction . input): the neuron that
  carries exactly its feature.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import memel
from memel.analysis.monosemantic_ratio import Criterion
from memel.errors import ConfigError

FEATURELESS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gaussian": lambda z: z,
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def featureless_batches(shape: str, batch: int, neurons: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless ``[batch, neurons]`` batches of ``FEATURELESS[shape]`` of i.i.d. N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    act = FEATURELESS[shape]
    while True:
        yield act(torch.randn(batch, neurons, generator=generator))


def planted_batches(p: float, batch: int, neurons: int, seed: int, input_dim: int = 1024) -> Iterator[torch.Tensor]:
    """Endless ``[batch, neurons]`` batches: neuron k = ReLU(direction_k . input) for ``neurons`` planted
    features active with probability ``p`` (see the module doc)."""
    from memel.data.planted import SparseFeatureLoader

    loader = SparseFeatureLoader(
        batch,
        num_features=neurons,
        input_dim=max(input_dim, neurons),
        active_prob=p,
        samples_per_epoch=2**20,
        seed=seed,
    )
    directions = torch.from_numpy(loader.directions)
    for item in loader:
        yield F.relu(item.inputs @ directions.T)


def flagged_per_snapshot(
    batches: Iterator[torch.Tensor],
    criterion: Criterion,
    batches_per_snapshot: int,
    snapshots: int,
    kernel: str = "auto",
) -> tuple[np.ndarray, int]:
    """Fraction of neurons flagged at each snapshot (``[snapshots]``) and the samples per snapshot,
    through a real Inhibitor (mode ``original``, ``ms_threshold`` = the criterion's, ``kernel``)."""
    inhibitor = memel.Inhibitor(mode="original", ms_threshold=criterion.threshold, kernel=kernel).train()
    cut = criterion.min_fraction * (1 - 1e-6)
    flagged, samples = [], 0
    with torch.no_grad():
        for _ in range(snapshots):
            samples = 0
            for _ in range(batches_per_snapshot):
                values = next(batches)
                inhibitor(values)
                samples += values.shape[0]
            frac = inhibitor.snapshot().frac_above.numpy()
            flagged.append(float((frac >= cut).mean()) if criterion.min_fraction > 0 else float("nan"))
    return np.asarray(flagged), samples


@dataclass(frozen=True)
class CalibrationRow:
    source: str
    samples: int  # per snapshot
    neurons: int
    snapshots: int
    tested: bool  # samples >= criterion.min_samples()
    flagged: float  # mean fraction of neurons flagged over the snapshots
    flagged_max: float
    expected_false_positive: float  # per-neuron rate under the heaviest featureless null at this n
    seconds: float


def calibrate(
    criterion: Criterion | None = None,
    samples: Sequence[int] = (640, 2560, 10240),
    probabilities: Sequence[float] = (0.005, 0.01, 0.02, 0.03, 0.05, 0.1),
    neurons: int = 256,
    snapshots: int = 4,
    batch: int = 64,
    seed: int = 0,
    kernel: str = "auto",
) -> list[CalibrationRow]:
    """Flagged fractions of every featureless shape and planted probability at every per-snapshot
    sample count (a multiple of ``batch``)."""
    criterion = criterion or Criterion()
    if neurons < 1 or snapshots < 1 or batch < 1:
        raise ConfigError(f"need neurons, snapshots and batch >= 1; got {neurons}, {snapshots} and {batch}")
    for n in samples:
        if n < batch or n % batch:
            raise ConfigError(f"samples: got {n}; every count must be a positive multiple of --batch ({batch})")
    for p in probabilities:
        if not 0 < p <= 1:
            raise ConfigError(f"probabilities: got {p!r}; each must be in (0, 1]")
    needed = criterion.min_samples()
    sources: list[tuple[str, Callable[[], Iterator[torch.Tensor]]]] = [
        (shape, lambda shape=shape: featureless_batches(shape, batch, neurons, seed)) for shape in FEATURELESS
    ]
    sources += [(f"planted p={p:g}", lambda p=p: planted_batches(p, batch, neurons, seed)) for p in probabilities]
    rows = []
    for n in samples:
        for name, make in sources:
            started = time.perf_counter()
            flagged, seen = flagged_per_snapshot(make(), criterion, n // batch, snapshots, kernel)
            rows.append(
                CalibrationRow(
                    source=name,
                    samples=seen,
                    neurons=neurons,
                    snapshots=snapshots,
                    tested=needed is not None and seen >= needed,
                    flagged=float(flagged.mean()),
                    flagged_max=float(flagged.max()),
                    expected_false_positive=criterion.false_positive(seen),
                    seconds=time.perf_counter() - started,
                )
            )
    return rows
