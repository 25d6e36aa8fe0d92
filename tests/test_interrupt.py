"""How a stopped or failed run ends: KILLED on Ctrl-C, the real cause shown first, the resume command."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from memel.tracking import MlflowTracker, default_tracking_uri
from memel.training.interrupt import describe, end_after_error, resume_command


def test_the_root_cause_of_a_worker_failure_comes_first() -> None:
    """Ray Train wraps a worker's PermissionError; the line shown is the PermissionError."""
    from ray.train import WorkerGroupError

    denied = PermissionError(13, "Permission denied", "/runs/out/checkpoints/x")
    try:
        try:
            raise denied
        except PermissionError as error:
            raise RuntimeError("upload failed") from error
    except RuntimeError as wrapped:
        failure = WorkerGroupError("rank 0 failed", {0: wrapped})
    assert describe(failure) == "PermissionError: [Errno 13] Permission denied: '/runs/out/checkpoints/x'"


def test_a_stopped_run_ends_killed_and_a_broken_store_does_not_hide_the_cause(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    uri = default_tracking_uri(tmp_path / "out")
    tracker = MlflowTracker(uri, "stop")
    run_id = tracker.start()
    end_after_error(tracker, KeyboardInterrupt())
    assert MlflowClient(uri).get_run(run_id).info.status == "KILLED"

    broken = MlflowTracker(uri, "stop")
    broken.start()
    shutil.rmtree(tmp_path / "out")
    (tmp_path / "out").write_text("the folder is gone")  # the store cannot be opened any more
    end_after_error(broken, PermissionError(13, "Permission denied"))  # must not raise
    assert "could not mark MLflow run" in capfd.readouterr().err


def test_the_resume_command_is_the_command_line_again() -> None:
    assert (
        resume_command(["/usr/bin/memel", "run", "jobs/a b.yaml", "--set", "x=[1, 2]"])
        == "memel run 'jobs/a b.yaml' --set 'x=[1, 2]'"
    )
