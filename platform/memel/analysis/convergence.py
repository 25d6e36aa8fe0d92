"""Whether a run's held-out loss has flattened by the end of training.

For a loss curve (evaluation steps and losses), the *tail* is the last ``tail`` fraction of the
recorded step range. A least-squares line through the tail's points gives

    tail_drop  = fitted loss at the tail's start - fitted loss at the last step
    total_drop = first recorded loss - fitted loss at the last step
    relative   = tail_drop / total_drop

and the curve has flattened when ``relative < threshold`` (default: the last quarter of
training gains less than 5% of what the whole run gained). The line, not the end points, makes
the test robust to evaluation noise: periodic evaluations read different held-out batches. A
curve that never fell (``total_drop <= 0``) has no gain to compare with and is reported as not
flattened, with ``relative`` NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: The defaults: the last quarter of the steps gains less than 5% of the total drop.
TAIL = 0.25
THRESHOLD = 0.05
#: The fewest evaluations a tail needs for a line through it.
MIN_TAIL_POINTS = 3


@dataclass(frozen=True)
class Flatness:
    """The verdict of :func:`loss_flattened` and the numbers behind it."""

    flattened: bool
    relative: float
    tail_drop: float
    total_drop: float
    tail_start: int
    last_step: int
    tail_points: int


def loss_flattened(
    steps: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    tail: float = TAIL,
    threshold: float = THRESHOLD,
) -> Flatness:
    """Whether the loss curve ``losses`` at ``steps`` has flattened (see the module doc)."""
    x, y = np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"steps and losses must be 1-D of one length; got shapes {x.shape} and {y.shape}")
    if not (0.0 < tail <= 1.0 and threshold > 0):
        raise ValueError(f"tail must be in (0, 1] and threshold > 0; got tail={tail}, threshold={threshold}")
    keep = np.isfinite(x) & np.isfinite(y)
    order = np.argsort(x[keep], kind="stable")
    x, y = x[keep][order], y[keep][order]
    if len(x) == 0:
        raise ValueError("no finite (step, loss) points")
    start = x[-1] - tail * (x[-1] - x[0])
    in_tail = x >= start
    if int(in_tail.sum()) < MIN_TAIL_POINTS:
        raise ValueError(
            f"the last {tail:.0%} of the steps holds {int(in_tail.sum())} evaluation(s); need {MIN_TAIL_POINTS} "
            "(evaluate more often or widen the tail)"
        )
    slope, intercept = np.polyfit(x[in_tail], y[in_tail], 1)
    end = slope * x[-1] + intercept
    tail_drop = float(-slope * (x[-1] - start))
    total_drop = float(y[0] - end)
    relative = tail_drop / total_drop if total_drop > 0 else math.nan
    return Flatness(
        flattened=bool(total_drop > 0 and relative < threshold),
        relative=relative,
        tail_drop=tail_drop,
        total_drop=total_drop,
        tail_start=int(round(start)),
        last_step=int(x[-1]),
        tail_points=int(in_tail.sum()),
    )
