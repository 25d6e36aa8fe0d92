"""``memel bench ddp``'s arithmetic on constructed step times, and its DDP side really run under torchrun."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from memel.benchmarks.ddp import _ddp_times, compare
from memel.training import load_spec

ROOT = Path(__file__).resolve().parents[1]


def test_the_ratio_is_taken_over_the_steps_both_sides_timed_after_the_first_fifth() -> None:
    memel = {"steps": list(range(1, 11)), "seconds": [9.0, 9.0] + [0.02 * s for s in range(3, 11)]}
    ddp = {"steps": list(range(1, 11)), "seconds": [5.0, 5.0] + [0.01 * s for s in range(3, 10)]}  # step 10 untimed
    row = compare("m", 2, memel, ddp)
    steps = range(3, 10)  # after step 10 // 5 = 2, timed by both
    assert row.steps == len(steps)
    assert row.memel_median_ms == pytest.approx(1000 * statistics.median(0.02 * s for s in steps))
    assert row.ddp_median_ms == pytest.approx(1000 * statistics.median(0.01 * s for s in steps))
    assert row.ratio == pytest.approx(0.5) and row.mean_ratio == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no common step"):
        compare("m", 2, memel, {"steps": [1, 2], "seconds": [1.0, 1.0]})


def test_the_ddp_loop_runs_under_torchrun_and_times_every_step(tmp_path: Path) -> None:
    spec = load_spec(str(ROOT / "jobs" / "smoke.yaml"), ["train.steps=4", "train.log_every=2"])
    times = _ddp_times(spec, tmp_path)
    assert times["steps"] == [2, 3, 4] and len(times["seconds"]) == 3  # each from the end of the step before
    assert all(seconds > 0 for seconds in times["seconds"])
