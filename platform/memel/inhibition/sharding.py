"""Statistics sharded across the data-parallel ranks: which neurons a rank holds, and the row
layout of what one training call contributes.

With ``execution.shard_statistics`` each of the W ranks of a module's process group holds the
history (mean, var, count), the pending moments and the snapshot window of ``padded`` =
ceil(N / W) neurons: rank r the columns [r x padded, (r+1) x padded), the last rank's tail
past N unused. Every call reduce-scatters its per-neuron contributions (moments in float64,
window counters in float32, exact integers at any per-call count) into the shards, and
all-gathers the history mean and variance of one module just before it scores the call; that
gathered copy lives for the call only.
"""

from __future__ import annotations

from dataclasses import dataclass

#: float64 rows a call reduce-scatters: the pending moments (``layout.P_*`` order).
#: float32 rows a call reduce-scatters (summed): MS sum, samples behind it, samples above the
#: MS threshold, times selected.
C_MS_SUM, C_MS_N, C_ABOVE, C_SELECTED = range(4)
COUNTER_ROWS = 4
#: Numbers every rank needs whole, riding after the float64 rows: samples counted over all
#: neurons (whether the call is a batch at all), samples tracked, and threshold selection's
#: values above tau and values judged.
E_COUNTED, E_TRACKED, E_TAU_ABOVE, E_TAU_JUDGED = range(4)
EXTRAS = 4
#: Rows of a shard's int32 window counters (``Inhibitor.window_counts``).
S_SELECTED, S_INHIBITED, S_MS_N, S_ABOVE = range(4)
SHARD_COUNT_ROWS = 4


@dataclass(frozen=True)
class Shard:
    """The neurons one rank holds of a module's N: columns [start, start + padded)."""

    neurons: int
    world: int
    rank: int

    @property
    def padded(self) -> int:
        return -(-self.neurons // self.world)

    @property
    def start(self) -> int:
        return self.rank * self.padded

    @property
    def held(self) -> int:
        """Neurons of the shard that exist (the last ranks' tails past N do not)."""
        return max(0, min(self.padded, self.neurons - self.start))
