"""An MLflow run whose id lives in a state file: the same file on a rerun resumes the same run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from memel.atomic import read_state, write_json

from .mlflow_tracker import MlflowTracker


def start_recorded_run(
    state_file: Path,
    id_key: str,
    record: Callable[[str], Mapping[str, Any]],
    tracking_uri: str,
    experiment: str,
    run_name: str,
    *,
    resumable: Callable[[Mapping[str, Any]], bool] = lambda previous: True,
    parent_run_id: str | None = None,
) -> tuple[MlflowTracker, bool]:
    """Start (or resume) the run whose id is ``state_file``'s ``id_key`` when ``resumable(previous
    state)`` holds, then write ``record(run_id)`` to ``state_file``. Returns the tracker and whether
    the run is new (its id differs from the recorded one): a new run still needs its params and tags."""
    previous = read_state(state_file, missing={})
    run_id = previous.get(id_key) if resumable(previous) else None
    tracker = MlflowTracker(tracking_uri, experiment, run_id=run_id, run_name=run_name, parent_run_id=parent_run_id)
    started = tracker.start()
    write_json(state_file, dict(record(started)))
    return tracker, previous.get(id_key) != started
