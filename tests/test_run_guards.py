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


def _record(folder: Path, name: str, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(record))


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _refused_as_another_spec(result, folder: Path, before: list[str], root: Path) -> None:
    """One error line naming the folder and what to do, exit 2, no traceback, nothing written."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert errors[0].startswith("error: output_dir: ") and str(folder) in errors[0], errors
    assert "different spec" in errors[0] and "--set output_dir=" in errors[0] and "remove" in errors[0], errors
    assert "Traceback" not in result.output
    assert _listing(root) == before, "nothing is written"


def test_a_folder_holding_a_run_of_another_spec_is_refused(tmp_path: Path) -> None:
    """`memel run` and `memel train` (and `memel validate`, which checks it first) into the folder of
    the same job run with another learning rate."""
    from memel.training import load_spec

    out = tmp_path / "out"
    other = load_spec(JOBS / "smoke.yaml", ["train.lr=0.01"]).run_name
    assert other != load_spec(JOBS / "smoke.yaml").run_name
    _record(out, "run.json", {"run_name": other, "run_id": "abc", "tracking_uri": "sqlite:///x"})
    before = _listing(tmp_path)
    for command in ("validate", "run", "train"):
        result = RUNNER.invoke(app, [command, str(JOBS / "smoke.yaml"), "--set", f"output_dir={out}"])
        _refused_as_another_spec(result, out, before, tmp_path)
        assert other in result.output


def test_a_sweep_folder_of_another_spec_or_kind_is_refused(tmp_path: Path) -> None:
    """The sweep's folder records its job and base fingerprint; each member folder its run's name;
    a single run's folder is not a sweep's."""
    from memel.orchestration import expand_sweep, load_job
    from memel.orchestration.sweep_folders import sweep_claim

    out = tmp_path / "sweep"
    job = load_job(JOBS / "quickstart.yaml", [f"output_dir={out}"])
    changed = load_job(JOBS / "quickstart.yaml", [f"output_dir={out}", "train.steps=7"])
    _record(out, "sweep.json", {"job": job.name, "fingerprint": changed.base_fingerprint(), "parent_run_id": "p"})
    before = _listing(tmp_path)
    _refused_as_another_spec(_run(out, "quickstart.yaml"), out, before, tmp_path)

    # the sweep's record matches; one member's folder holds that member with another base
    (out / "sweep.json").write_text(json.dumps({**sweep_claim(job).identity, "parent_run_id": "p"}))
    member, changed_member = expand_sweep(job)[1], expand_sweep(changed)[1]
    _record(member.spec.out, "run.json", {"run_name": changed_member.spec.run_name, "run_id": "m"})
    before = _listing(tmp_path)
    _refused_as_another_spec(_run(out, "quickstart.yaml"), member.spec.out.resolve(), before, tmp_path)

    single = tmp_path / "single"
    _record(single, "run.json", {"run_name": "smoke-0123456789", "run_id": "s"})
    before = _listing(tmp_path)
    _refused_as_another_spec(_run(single, "quickstart.yaml"), single, before, tmp_path)


def test_a_study_folder_of_another_spec_is_refused(tmp_path: Path) -> None:
    from memel.orchestration import load_job
    from memel.orchestration.study import study_fingerprint

    out = tmp_path / "study"
    changed = load_job(JOBS / "tune_memel.yaml", ["train.steps=7"])
    fingerprint = study_fingerprint(changed, changed.tune)
    _record(out, "study.json", {"study": "tune_memel", "fingerprint": fingerprint, "parent_run_id": "p"})
    before = _listing(tmp_path)
    result = RUNNER.invoke(app, ["tune", str(JOBS / "tune_memel.yaml"), "--set", f"output_dir={out}"])
    _refused_as_another_spec(result, out, before, tmp_path)


def test_the_same_spec_is_accepted_and_more_trials_or_members_are_the_same_spec(tmp_path: Path) -> None:
    """What resumes: the same run name; a study asked for more trials; a sweep with more seeds."""
    from memel.orchestration import load_job
    from memel.orchestration.study import study_fingerprint
    from memel.orchestration.sweep_folders import check_folders, sweep_claim
    from memel.training import load_spec
    from memel.training.output_dir import check_output_dir, run_claim

    spec = load_spec(JOBS / "smoke.yaml", ["train.placement=SPREAD"])  # where it runs is not the spec
    _record(tmp_path / "run", "run.json", {"run_name": load_spec(JOBS / "smoke.yaml").run_name})
    check_output_dir(tmp_path / "run", claim=run_claim(spec.run_name))

    job = load_job(JOBS / "quickstart.yaml", [f"output_dir={tmp_path / 'sweep'}"])
    _record(tmp_path / "sweep", "sweep.json", dict(sweep_claim(job).identity))
    check_folders(load_job(JOBS / "quickstart.yaml", [f"output_dir={tmp_path / 'sweep'}", "sweep.seeds=[0,1,2]"]))

    study = load_job(JOBS / "tune_memel.yaml")
    more = load_job(JOBS / "tune_memel.yaml", ["tune.trials=40", "tune.parallel=2", "tune.storage=journal:///x"])
    assert study_fingerprint(study, study.tune) != study_fingerprint(more, more.tune)  # the storage is the study's
    fewer = load_job(JOBS / "tune_memel.yaml", ["tune.trials=3"])
    assert study_fingerprint(study, study.tune) == study_fingerprint(fewer, fewer.tune)


def test_two_concurrent_tunes_of_one_study_folder_do_not_both_run(tmp_path: Path) -> None:
    """Two real `memel tune` processes: the second names the first's pid and exits 2, writing nothing."""
    import signal
    import time

    out = tmp_path / "study"
    command = [
        sys.executable,
        "-m",
        "memel",
        "tune",
        str(JOBS / "tune_memel.yaml"),
        "--trials",
        "1",
        "--set",
        f"output_dir={out}",
        "--set",
        "train.steps=200",
        "--set",
        "train.workers=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "platform"), "COLUMNS": "240"}
    env.pop("RAY_ADDRESS", None)
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        lock = out / ".memel.lock"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if lock.exists() and f'"pid": {first.pid}' in lock.read_text():
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"the first memel tune never took the lock: {first.communicate()[0][-3000:]!r}")
        second = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    output = second.stdout + second.stderr
    assert second.returncode == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"in use by memel (pid {first.pid}" in errors[0], output
    assert "output_dir" in errors[0] and "Traceback" not in output
