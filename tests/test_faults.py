"""A real 2-member sweep stopped with SIGINT and SIGKILL of its driver at random steps, then run
again: no Parquet row and no MLflow (run, key, step) is duplicated, and the statistics and train
metrics equal those of the same sweep run without interruption.

Set MEMEL_FAULT_SEED to replay one draw of the interruption steps (the failure message names it).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

JOBS = Path(__file__).resolve().parents[1] / "jobs"
STEPS = 16
SWEEP = [
    "--set",
    "sweep.rungs=[byte-0.2m]",
    "--set",
    "sweep.modes=[rd]",
    "--set",
    "sweep.seeds=[0,1]",
    "--set",
    f"train.steps={STEPS}",
    "--set",
    "train.log_every=1",
    "--set",
    "eval.every=8",
    "--set",
    "eval.batches=1",
    "--set",
    "stats.every=1",
    "--set",
    "checkpoint.every=2",
    "--set",
    "inhibition.late_start=1",
    "--set",
    "inhibition.forget_steps=2",
    "--set",
    "tracking.experiment=faults",
    "--set",
    "train.workers=1",  # both members at once on two cores (2-rank checkpoints: test_training_ray)
]
#: Metrics that measure time, not training: they differ between any two runs.
TIMING = ("train/items_per_s", "train/tokens_per_s", "train/step_time_s")
KEY = ["run_id", "module", "step", "neuron"]


def _command(out: Path) -> list[str]:
    return [sys.executable, "-m", "memel", "run", str(JOBS / "quickstart.yaml"), *SWEEP, "--set", f"output_dir={out}"]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "platform")
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
        "COLUMNS": "200",
    }


def _steps_written(out: Path) -> int:
    """Training steps the members have completed, summed over members, read from the disk: with
    ``stats.every=1`` each member writes one statistics file per step and module, named by its step
    (a replayed step replaces its file). The driver's forwarded step lines are no clock: on a busy
    machine Ray's log forwarding can lag the training by most of a run."""
    total = 0
    for run in (out / "stats").glob("run_id=*"):
        modules = sorted(run.glob("module=*"))
        if modules:
            total += len(list(modules[0].glob("part-*.parquet")))
    return total


def _run(out: Path, stop: tuple[int, signal.Signals] | None = None) -> tuple[int, str]:
    """Run the sweep; with ``stop`` = (n, signal), send the signal to the driver once the members
    have written n more training steps. Returns the exit status and the output."""
    before = _steps_written(out)
    process = subprocess.Popen(
        _command(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True
    )
    lines: list[str] = []
    assert process.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    sent = None
    while process.poll() is None:
        if stop and sent is None and _steps_written(out) >= before + stop[0]:
            process.send_signal(stop[1])
            sent = _steps_written(out) - before
        time.sleep(0.1)
    code = process.wait(timeout=600)
    reader.join(timeout=60)
    try:  # what the driver started and left behind (a SIGKILLed driver cannot stop it)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(1.0)
    text = "".join(lines)
    assert stop is None or sent is not None, f"never reached {stop[0]} steps:\n{text[-3000:]}"
    assert sent is None or sent < 2 * STEPS - 4, f"the signal went out only after {sent} of {2 * STEPS} steps"
    return code, text


def _member_runs(out: Path) -> dict[str, str]:
    """member key -> its MLflow run id."""
    return {
        p.name: json.loads((p / "run.json").read_text())["run_id"]
        for p in sorted((out / "members").iterdir())
        if (p / "run.json").exists()
    }


def _stats(out: Path):
    table = ds.dataset(str(out / "stats"), partitioning="hive").to_table().to_pandas()
    table["run_id"] = table["run_id"].astype(str)
    table["module"] = table["module"].astype(str)
    return table


def _histories(out: Path) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(member key or 'parent', metric key) -> [(step, value)] in the order MLflow returns them."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = {"parent": json.loads((out / "sweep.json").read_text())["parent_run_id"], **_member_runs(out)}
    found = {}
    for name, run_id in runs.items():
        for key in client.get_run(run_id).data.metrics:
            found[(name, key)] = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "whole"
    code, text = _run(out)
    assert code == 0, text[-3000:]
    return out


@pytest.mark.timeout(900)
def test_interrupted_sweep_resumes_without_duplicates(reference: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    seed = int(os.environ.get("MEMEL_FAULT_SEED", random.randrange(10**6)))
    draw = random.Random(seed)
    sigint_after, sigkill_after = draw.randint(2, 6), draw.randint(2, 5)
    where = f"(MEMEL_FAULT_SEED={seed}: SIGINT after {sigint_after} steps, SIGKILL after {sigkill_after} more)"
    out = tmp_path / "faulted"

    code, text = _run(out, (sigint_after, signal.SIGINT))
    assert code == 130, f"{where}\n{text[-3000:]}"
    assert "interrupted:" in text and "resume it with: memel run" in text, where
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent_id = json.loads((out / "sweep.json").read_text())["parent_run_id"]
    assert client.get_run(parent_id).info.status == "KILLED", where
    statuses = {client.get_run(r).info.status for r in _member_runs(out).values()}
    assert "KILLED" in statuses and statuses <= {"KILLED", "FINISHED"}, (where, statuses)  # none left RUNNING

    code, text = _run(out, (sigkill_after, signal.SIGKILL))
    assert code == -signal.SIGKILL, f"{where}\n{text[-3000:]}"
    code, text = _run(out)
    assert code == 0, f"{where}\n{text[-3000:]}"

    stats, expected = _stats(out), _stats(reference)
    assert not stats.duplicated(KEY).any(), f"{where}: {int(stats.duplicated(KEY).sum())} duplicate rows"
    assert len(stats) == len(expected), where
    names, expected_names = _member_runs(out), _member_runs(reference)
    stats["run_id"] = stats["run_id"].map({v: k for k, v in names.items()})
    expected["run_id"] = expected["run_id"].map({v: k for k, v in expected_names.items()})
    merged = stats.merge(expected, on=KEY, suffixes=("", "_whole"))
    assert len(merged) == len(expected), where
    for column in (
        "mean",
        "var",
        "count",
        "batches",
        "selected_count",
        "inhibited_count",
        "max_ms",
        "mean_ms",
        "frac_above",
        "tokens_seen",
    ):
        if column in stats.columns:
            assert (merged[column] - merged[f"{column}_whole"]).abs().max() <= 1e-6 * (
                1 + merged[column].abs().max()
            ), (where, column)
    assert stats.groupby(["run_id", "module", "step"]).size().eq(256).all(), where  # byte-0.2m: 256 neurons a module

    got, whole = _histories(out), _histories(reference)
    for (run, key), history in got.items():
        steps = [step for step, _ in history]
        assert len(steps) == len(set(steps)), f"{where}: {run} {key} has duplicate steps {steps}"
    assert set(got) == set(whole), (where, set(got) ^ set(whole))
    evaluation = {k for k in got if k[1].startswith(("eval/", "heldout/", "eval_loss/"))}
    for name in set(got) - evaluation:
        if name[1] in TIMING:
            assert [s for s, _ in got[name]] == [s for s, _ in whole[name]], (where, name)
            continue
        assert [s for s, _ in got[name]] == [s for s, _ in whole[name]], (where, name)
        assert [v for _, v in got[name]] == pytest.approx([v for _, v in whole[name]], rel=1e-5, abs=1e-7), (
            where,
            name,
        )
    different = sorted(n for n in evaluation if got[n] != pytest.approx(whole[n], rel=1e-5))
    assert not different, f"{where}: eval metrics differ from the uninterrupted run's: {different[:4]}"
