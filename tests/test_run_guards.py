"""What `memel run` refuses before it writes anything: an output folder another invocation is
using, an unrelated non-empty folder, a file in place of the folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memel.cli import app
from memel.training.run_lock import hold_lock

RUNNER = CliRunner(env={"COLUMNS": "240"})
JOBS = Path(__file__).resolve().parents[1] / "jobs"


def _run(out: Path, job: str = "smoke.yaml"):
    return RUNNER.invoke(app, ["run", str(JOBS / job), "--set", f"output_dir={out}"])


@pytest.mark.parametrize("job", ["smoke.yaml", "quickstart.yaml"])
def test_a_second_invocation_of_a_running_job_stops_without_writing(job: str, tmp_path: Path) -> None:
    """A real flock held by another process (a running `memel run`): the second one names it and exits 2."""
    out = tmp_path / "out"
    script = (
        "import sys, time; from pathlib import Path; from memel.training.run_lock import hold_lock\n"
        "with hold_lock(Path(sys.argv[1])):\n print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "platform")},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = _run(out, job)
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "output_dir" in result.output and f"pid {holder.pid}" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == [".memel.lock"]  # nothing else written


def test_the_lock_is_released_with_its_holder(tmp_path: Path) -> None:
    with hold_lock(tmp_path):
        lock = json.loads((tmp_path / ".memel.lock").read_text())
        assert lock["pid"] == os.getpid() and lock["host"] and lock["started"]
    with hold_lock(tmp_path):  # free again
        pass


def test_an_unrelated_output_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": true}')
    result = _run(out)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "output_dir" in result.output and "not empty" in result.output
    assert (out / "summary.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    result = _run(a_file, "quickstart.yaml")
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "is a file" in result.output and "Traceback" not in result.output
    assert a_file.read_text() == "x"
