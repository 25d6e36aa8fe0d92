"""A real run whose output folder stops taking writes mid-run: the folder lives on a small tmpfs
that is made immutable (``chattr -R +i``: a PermissionError even for root) or filled to
capacity (ENOSPC) after the first checkpoint. The command's first ``error:`` line is that cause,
the MLflow run (a store outside the broken folder) ends FAILED, not RUNNING, and a warning names
the statistics that could not be written.

These need root's mount and immutable-file rights (``CAP_SYS_ADMIN``, ``CAP_LINUX_IMMUTABLE``):
elsewhere they are skipped, saying why. ``chmod`` is no test for root: root writes through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parents[1] / "jobs"
STEPS = 12
BREAK_AFTER = 5  # steps; the first checkpoint is at step 4, the next (which cannot be written) at 8


@contextlib.contextmanager
def _small_disk(folder: Path, size: str = "64m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``folder`` for the block (skips the test where mounting is not allowed)."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode}); needs CAP_SYS_ADMIN")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-R", "-i", str(folder)], capture_output=True)
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _make_immutable(folder: Path) -> None:
    done = subprocess.run(["chattr", "-R", "+i", str(folder)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as filler:
        try:
            while True:
                filler.write(b"\0" * 2**20)
                filler.flush()
        except OSError as error:
            assert error.errno == 28, error  # ENOSPC


BREAKS = {"immutable": (_make_immutable, ("PermissionError",)), "full": (_fill, ("No space left", "Errno 28"))}


def _command(out: Path, tracking: str) -> list[str]:
    overrides = [
        f"output_dir={out}",
        f"tracking.uri={tracking}",
        f"train.steps={STEPS}",
        "train.workers=1",
        "train.log_every=1",
        "stats.every=1",
        "checkpoint.every=4",
        "checkpoint.max_failures=0",
        "eval.every=12",
        "eval.batches=1",
        "inhibition.late_start=1",
        "inhibition.forget_steps=2",
    ]
    return [
        sys.executable,
        "-m",
        "memel",
        "train",
        str(JOBS / "smoke.yaml"),
        *(a for o in overrides for a in ("--set", o)),
    ]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("how", sorted(BREAKS))
def test_an_output_folder_that_stops_taking_writes_mid_run(how: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    breaker, causes = BREAKS[how]
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"  # outside the broken folder: it can record the failure
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "platform"),
        "PYTHONUNBUFFERED": "1",
        "RAY_DEDUP_LOGS": "0",
        "COLUMNS": "300",
    }
    env.pop("RAY_ADDRESS", None)
    with _small_disk(tmp_path / "disk") as disk:
        out = disk / "out"
        process = subprocess.Popen(
            _command(out, tracking),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        lines, broken = [], False
        assert process.stdout is not None
        try:
            for line in process.stdout:
                lines.append(line)
                if not broken and f"[memel] step {BREAK_AFTER}/{STEPS} " in line:
                    breaker(disk)
                    broken = True
            code = process.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        output = "".join(lines)
        assert broken, f"never reached step {BREAK_AFTER}:\n{output[-3000:]}"
        run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert code == 1, output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors and errors[0].startswith("error: the run failed: "), output[-4000:]
    assert any(cause in errors[0] for cause in causes), errors
    assert "sqlite" not in errors[0] and "unable to open database" not in errors[0], errors
    assert MlflowClient(tracking).get_run(run_id).info.status == "FAILED"
    warnings = [line for line in output.splitlines() if "not written to" in line]
    assert warnings, output[-4000:]
    assert f"run {run_id}" in warnings[0] and "step" in warnings[0] and "modules " in warnings[0], warnings
    assert any(cause in warnings[0] for cause in causes), warnings  # the warning says why, too


def test_the_driver_names_the_statistics_mlflow_saw_and_the_root_lacks(tmp_path: Path, capsys) -> None:
    """Constructed records: MLflow has snapshots at steps 1-6 of two modules, the root holds steps
    1-3 of one and 1-2 of the other; the warning names steps 3-6 and both modules. All stored: silent."""
    from mlflow import MlflowClient

    from memel.stats.stats_root import part_name, partition_dir
    from memel.training.lost_statistics import warn_unwritten

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("lost")).info.run_id
    stored = {"blocks.0/mlp.act": 3, "blocks.1/mlp.act": 2}
    root = tmp_path / "stats"
    for module, last in stored.items():
        for step in range(1, 7):
            client.log_metric(run_id, f"inhibited/{module}", float(step), step=step)
        folder = Path(partition_dir(str(root), run_id, module))
        folder.mkdir(parents=True)
        for step in range(1, last + 1):
            (folder / part_name(step)).write_bytes(b"")
    warn_unwritten(str(root), run_id, client, "PermissionError: denied")
    shown = capsys.readouterr().out
    assert (
        f"not written to {root}: run {run_id}, steps 3-6 (4 steps), modules blocks.0/mlp.act, blocks.1/mlp.act" in shown
    )
    assert "(7 module-steps;" in shown and "PermissionError: denied" in shown

    for module in stored:
        for step in range(1, 7):
            (Path(partition_dir(str(root), run_id, module)) / part_name(step)).write_bytes(b"")
    warn_unwritten(str(root), run_id, client, "PermissionError: denied")
    assert capsys.readouterr().out == ""
