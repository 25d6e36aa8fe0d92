"""Per-step wall times for benchmarks: with ``MEMEL_STEP_TIMES_FILE`` set, rank 0 writes the
time between the ends of consecutive optimizer steps to that JSON file when the run ends
(``{"steps": [2, 3, ...], "seconds": [...]}``; step ``k``'s time runs from the end of step
``k - 1``, so what the loop does between steps, logging, evaluation, snapshots, is in it)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .base import Callback

STEP_TIMES_ENV = "MEMEL_STEP_TIMES_FILE"


def step_times(ends: list[tuple[int, float]]) -> dict[str, list[float]]:
    """``(step, end time)`` pairs in order to each step's time since the previous step's end."""
    pairs = zip(ends, ends[1:])
    rows = [(step, end - previous) for (_, previous), (step, end) in pairs]
    return {"steps": [step for step, _ in rows], "seconds": [seconds for _, seconds in rows]}


class StepTimer(Callback):
    """Stamps the end of every step; writes the step times to ``path`` on close."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.ends: list[tuple[int, float]] = []

    def post_step(self, step: int) -> None:
        self.ends.append((step, time.perf_counter()))

    def close(self, failed: bool = False) -> None:
        self.path.write_text(json.dumps(step_times(self.ends)))
