"""The null behind the monosemantic ratio: how often a featureless neuron exceeds an MS threshold.

A featureless neuron is an elementwise activation of i.i.d. Gaussian pre-activations:
``identity``, ``relu``, ``gelu`` or ``silu`` of N(0, 1) (the activations memel's models use;
the scale and shift of the pre-activation do not matter for identity and relu, and the
unit Gaussian is the worst case found for gelu and silu at the thresholds used). For each,
:func:`null_tail_rates` computes P(MS > T) with MS = (z - mean)^2 / var taken at the shape's
exact mean and variance, by quadrature over the Gaussian (an independent Monte Carlo check is
in the tests). :func:`null_rate` is the largest of them: the heaviest featureless tail.

A neuron that carries a sparse feature (value ~A on a fraction p of samples, ~0 elsewhere)
has MS ~ (1 - p)/p on its active samples, so at T = 36 features with p up to ~2.7% exceed it
on ~p of the samples, while the heaviest featureless shape (silu) does so on 1.3e-4.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from scipy import special
from scipy import stats as scipy_stats

#: The featureless reference shapes: f applied to z ~ N(0, 1).
NULL_SHAPES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": lambda z: z * scipy_stats.norm.cdf(z),
    "silu": lambda z: z * special.expit(z),
}

#: min_fraction must be at least this many times the null rate, so that featureless shapes
#: somewhat heavier than the reference ones (Laplace, exponential) stay below it too.
MARGIN = 5.0


@lru_cache(maxsize=64)
def null_tail_rates(threshold: float) -> dict[str, float]:
    """P(MS > ``threshold``) per reference shape (quadrature on a 2.4M-point grid over [-12, 12];
    the Gaussian mass beyond is below 1e-32, the grid error below 1e-8)."""
    z = np.linspace(-12.0, 12.0, 2_400_001)
    weight = scipy_stats.norm.pdf(z) * (z[1] - z[0])
    weight /= weight.sum()
    rates = {}
    for name, shape in NULL_SHAPES.items():
        value = shape(z)
        mean = float((value * weight).sum())
        var = float(((value - mean) ** 2 * weight).sum())
        rates[name] = float(weight[(value - mean) ** 2 > threshold * var].sum())
    return rates


def null_rate(threshold: float) -> float:
    """The heaviest featureless tail: max over :data:`NULL_SHAPES` of P(MS > ``threshold``)."""
    return max(null_tail_rates(float(threshold)).values())


def heaviest_shape(threshold: float) -> str:
    rates = null_tail_rates(float(threshold))
    return max(rates, key=rates.__getitem__)


def min_count(samples: int, min_fraction: float) -> int:
    """Samples above the threshold a neuron needs among ``samples`` to reach ``min_fraction`` (>= 1)."""
    return max(1, math.ceil(min_fraction * samples * (1 - 1e-6)))


def false_positive_rate(samples: int, min_fraction: float, rate: float) -> float:
    """P(a featureless neuron is flagged): P(Binomial(samples, rate) >= min_count), i.e. the
    per-neuron false-positive rate of the criterion on ``samples`` samples; 1 with no samples."""
    if samples < 1:
        return 1.0
    return float(scipy_stats.binom.sf(min_count(samples, min_fraction) - 1, samples, rate))


@lru_cache(maxsize=64)
def min_samples(min_fraction: float, rate: float, alpha: float, steps: int = 100_000) -> int | None:
    """The fewest samples per snapshot from which on the false-positive rate stays <= ``alpha`` at
    every larger count (None when it never does, e.g. when ``min_fraction`` <= ``rate``).

    The rate is a saw-tooth in the count: it rises while ``min_count`` stays at j and drops when it
    becomes j + 1, so its peaks are the largest counts with ``min_count`` = j; the answer is one
    past the last peak above ``alpha`` (checked up to j = ``steps``, far past the decline)."""
    if not 0 < min_fraction < 1 or min_fraction <= rate:
        return None
    j = np.arange(1, steps + 1)
    peaks = np.floor(j / (min_fraction * (1 - 1e-6))).astype(np.int64)
    peaks = np.maximum(peaks, 1)
    fp = scipy_stats.binom.sf(j - 1, peaks, rate)
    above = np.nonzero(fp > alpha)[0]
    if len(above) == 0:
        return 1
    if above[-1] == len(j) - 1:
        return None
    return int(peaks[above[-1]]) + 1
