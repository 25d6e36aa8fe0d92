"""Row layout of an Inhibitor's statistics buffers (shared by the module and the collectives)."""

from __future__ import annotations

# Rows of the ``pending`` buffer: this rank's moments since the last merge, as sums of
# d = z - mu and d^2 about the history mean mu (shared by all ranks), so they add up across
# calls, micro-batches and ranks: ``sync`` all-reduces exactly these rows.
P_COUNT, P_SUM_D, P_SUM_D2 = range(3)
PENDING_ROWS = PAYLOAD_ROWS = 3
# Rows of the ``window`` buffer: this rank's trackers since the last snapshot, updated in
# place by every call; ``snapshot`` reduces them across ranks (sums, then the max).
W_SELECTED, W_INHIBITED, W_MS_SUM, W_MS_N, W_ABOVE, W_TRACKED, W_MS_MAX = range(7)
WINDOW_ROWS = 7
SUMMED_WINDOW_ROWS = slice(W_SELECTED, W_MS_MAX)
# Entries of the ``tau_pending`` buffer (threshold selection): this rank's values judged
# against tau since the last merge, and how many of them had phi >= tau. They ride after the
# moments in the sync payload, so the threshold update costs no collective of its own.
T_ABOVE, T_JUDGED = range(2)
TAU_PENDING = 2
