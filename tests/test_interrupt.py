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


def test_ctrl_c_stops_a_single_training_run_with_the_resume_command(tmp_path: Path) -> None:
    """A real ``memel train`` (Ray Train in the driver, which installs a SIGINT handler of its own):
    Ctrl-C mid-run stops the workers, says how to resume, ends the MLflow run KILLED and exits 130."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import threading

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    command = [sys.executable, "-m", "memel", "train", str(root / "jobs" / "smoke.yaml")]
    command += ["--set", "train.steps=5000", "--set", "train.log_every=1", "--set", f"output_dir={out}"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "platform"), os.environ.get("PYTHONPATH")])),
    }
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    lines: list[str] = []
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        while process.poll() is None and not any("[memel] step 3/" in line for line in list(lines)):
            threading.Event().wait(0.2)
        assert process.poll() is None, "".join(lines)[-3000:]
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    reader.join(timeout=30)
    text = "".join(lines)
    assert code == 130, text[-3000:]
    assert "interrupted:" in text and "resume it with: memel train" in text, text[-3000:]
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_run(run_id).info.status == "KILLED"
