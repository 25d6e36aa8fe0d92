"""Sweeps and studies end to end through the real CLI on a local Ray instance: the quickstart sweep
at reduced size (MLflow parent and child runs on a real server, Parquet per member, re-run skips
and resumes) and Optuna studies with parallel trials on journal and PostgreSQL storage."""

from __future__ import annotations

import csv
import json
import socket
import uuid
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from typer.testing import CliRunner

from memel.cli import app

#: A password in the study's storage URL, which must not be written anywhere.
POSTGRES_PASSWORD = "pg-sentinel-4b1d"

RUNNER = CliRunner(env={"COLUMNS": "240"})
JOBS = Path(__file__).resolve().parents[1] / "jobs"
TINY = [
    "--set",
    "train.steps=3",
    "--set",
    "train.log_every=1",
    "--set",
    "eval.every=1",
    "--set",
    "eval.batches=1",
    "--set",
    "stats.every=3",
    "--set",
    "checkpoint.every=3",
    "--set",
    "inhibition.late_start=1",
    "--set",
    "inhibition.forget_steps=1",
]
NEURONS = {"byte-0.2m": 256, "byte-1m": 512}  # MLP width 4 x d_model
MODULES = {"byte-0.2m": 4, "byte-1m": 5}


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _children(client, parent_id: str) -> list:
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.timeout(900)
def test_quickstart_sweep_end_to_end_then_skips_and_resumes(tmp_path: Path, mlflow_server: str) -> None:
    out = tmp_path / "quickstart"
    args = [
        "run",
        str(JOBS / "quickstart.yaml"),
        *TINY,
        "--set",
        "sweep.rungs=[byte-0.2m, byte-1m]",
        "--set",
        f"output_dir={out}",
        "--set",
        f"tracking.uri={mlflow_server}",
        "--set",
        "tracking.experiment=ci-sweep",
    ]
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "sweep quickstart: 4 members" in result.output and "Parquet neuron statistics" in result.output

    parent_id = json.loads((out / "sweep.json").read_text())["parent_run_id"]
    client = _client(mlflow_server)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["memel.kind"] == "sweep" and parent.data.tags["memel.rungs"] == "byte-0.2m,byte-1m"
    assert {"sweep_table.csv", "sweep_table.json", "job.json"} <= {a.path for a in client.list_artifacts(parent_id)}
    children = _children(client, parent_id)
    assert sorted((c.data.tags["memel.rung"], c.data.tags["memel.mode"]) for c in children) == [
        ("byte-0.2m", "original"),
        ("byte-0.2m", "rd"),
        ("byte-1m", "original"),
        ("byte-1m", "rd"),
    ]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["memel.sweep"] == "quickstart" and child.data.tags["memel.kind"] == "sweep-member"
        assert (
            int(child.data.tags["memel.n_params"]) > 0
            and child.data.params["model.name"] == child.data.tags["memel.rung"]
        )
        assert "eval/loss" in child.data.metrics

    # one Parquet dataset for the sweep, one partition per member, each with its rung's neurons
    table = ds.dataset(out / "stats", partitioning="hive").to_table()
    by_run = {c.info.run_id: c.data.tags["memel.rung"] for c in children}
    run_ids = table.column("run_id").to_pylist()
    assert set(run_ids) == set(by_run)
    for run_id, rung in by_run.items():
        assert run_ids.count(run_id) == NEURONS[rung] * MODULES[rung]  # one snapshot (step 3)

    with open(out / "sweep_table.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["status"] for row in rows] == ["finished"] * 4
    assert all(float(row["eval_loss"]) > 0 and row["run_id"] in by_run for row in rows)
    inhibited = {row["member"]: float(row["inhibited"]) for row in rows}
    assert inhibited["byte-0.2m-original"] == 0 and inhibited["byte-0.2m-rd"] > 0

    # again: every member is skipped; nothing trains, the parent run is the same
    again = RUNNER.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (
        again.output.count("finished before") == 4
        and json.loads((out / "sweep.json").read_text())["parent_run_id"] == parent_id
    )

    # an interrupted member (no summary yet) resumes from its checkpoint in the same MLflow run
    member = out / "members" / "byte-1m-rd"
    run_id = json.loads((member / "run.json").read_text())["run_id"]
    (member / "summary.json").unlink()
    resumed = RUNNER.invoke(app, args)
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.count("finished before") == 3 and "finished byte-1m-rd" in resumed.output
    assert json.loads((member / "summary.json").read_text())["run_id"] == run_id
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == [1, 2, 3], "resuming a finished checkpoint trains no extra steps"
    assert len(_children(client, parent_id)) == 4


def _study(storage):
    import optuna

    from memel.orchestration.optuna_storage import open_storage

    return optuna.load_study(study_name="tune_memel", storage=open_storage(storage))


def _tune(tmp_path: Path, mlflow_server: str, *extra: str) -> list[str]:
    return [
        "tune",
        str(JOBS / "tune_memel.yaml"),
        *TINY,
        "--set",
        "train.workers=1",
        "--set",
        "train.micro_batch_size=16",
        "--set",
        f"output_dir={tmp_path / 'study'}",
        "--set",
        f"tracking.uri={mlflow_server}",
        "--set",
        "tracking.experiment=ci-study",
        "--set",
        "tune.pruner=none",
        *extra,
    ]


def _check_trials(study, mlflow_server: str, parent_id: str, finished: int) -> None:
    from optuna.trial import TrialState

    trials = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(trials) == finished
    client = _client(mlflow_server)
    for trial in trials:
        assert trial.intermediate_values, "rank 0 reports every evaluation to the study"
        assert trial.value == pytest.approx(trial.intermediate_values[max(trial.intermediate_values)])
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent_id and run.data.tags["memel.kind"] == "trial"
        assert run.data.params["inhibition.mode"] == trial.params["mode"]
    parent = client.get_run(parent_id)
    assert parent.data.tags["memel.kind"] == "study" and "memel.best_params" in parent.data.tags


@pytest.mark.timeout(900)
def test_study_runs_parallel_trials_on_journal_storage_and_continues(tmp_path: Path, mlflow_server: str) -> None:
    result = RUNNER.invoke(app, _tune(tmp_path, mlflow_server, "--trials", "3", "--parallel", "2"))
    assert result.exit_code == 0, result.output
    state = json.loads((tmp_path / "study" / "study.json").read_text())
    assert state["storage"].startswith("journal:///") and "optuna-dashboard" in result.output
    assert result.output.count("finished: eval/loss ") == 3  # each trial's line shows the study's metric
    _check_trials(_study(state["storage"]), mlflow_server, state["parent_run_id"], 3)

    more = RUNNER.invoke(app, _tune(tmp_path, mlflow_server, "--trials", "4", "--parallel", "2"))
    assert more.exit_code == 0, more.output
    assert more.output.count("started:") == 1, "the study continues: only the missing trial runs"
    _check_trials(_study(state["storage"]), mlflow_server, state["parent_run_id"], 4)


def _postgres_url() -> str:
    """The test database's URL, with a password that must never be stored (the server trusts
    local connections, so it is ignored there). Skips only when nothing listens on the port:
    any other failure to connect is a failure of the test."""
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=5).close()
    except ConnectionRefusedError:
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432 (connection refused)")
    return f"postgresql://root:{POSTGRES_PASSWORD}@127.0.0.1:5432/test"


@pytest.mark.timeout(900)
def test_study_with_parallel_trials_on_postgresql(tmp_path: Path, mlflow_server: str) -> None:
    url = _postgres_url()
    name = f"ci-{uuid.uuid4().hex[:8]}"
    result = RUNNER.invoke(
        app,
        _tune(
            tmp_path,
            mlflow_server,
            "--trials",
            "2",
            "--parallel",
            "2",
            "--set",
            f"tune.storage={url}",
            "--set",
            f"tune.study_name={name}",
        ),
    )
    assert result.exit_code == 0, result.output
    import optuna

    study = optuna.load_study(study_name=name, storage=url)
    state = json.loads((tmp_path / "study" / "study.json").read_text())
    assert POSTGRES_PASSWORD not in json.dumps(state), "credentials are never stored"
    assert POSTGRES_PASSWORD not in result.output, "credentials are never shown"
    assert state["storage"] == "postgresql://root:***@127.0.0.1:5432/test"
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 2
    optuna.delete_study(study_name=name, storage=url)


def test_pruning_decision_comes_from_the_study(tmp_path: Path) -> None:
    """What a trial's rank 0 does at each evaluation: report, ask the pruner (journal storage)."""
    import optuna

    from memel.orchestration.optuna_storage import open_storage
    from memel.training.callbacks import PruningCallback
    from memel.training.trial import TrialConfig

    url = f"journal:///{tmp_path / 'prune.journal'}"
    study = optuna.create_study(study_name="p", storage=open_storage(url))
    for _ in range(2):  # the median pruner starts after two finished trials
        good = study.ask()
        for step, value in enumerate([2.0, 1.5, 1.0], start=1):
            good.report(value, step)
        study.tell(good, 1.0)
    worse, better = study.ask(), study.ask()

    def pruner(trial: optuna.trial.Trial, name: str = "median") -> PruningCallback:
        return PruningCallback(TrialConfig(url, "p", trial.number, "eval/loss", name))

    assert pruner(worse).on_eval(1, {"eval/loss": 3.0}) is True
    assert pruner(better).on_eval(1, {"eval/loss": 1.0}) is False
    assert study.trials[2].intermediate_values == {1: 3.0}
    # a metric the run does not have is not reported (ranks other than 0 hold no pruning callback)
    assert pruner(better).on_eval(2, {"eval/accuracy": 0.5}) is False
    assert study.trials[3].intermediate_values == {1: 1.0}
    assert pruner(study.ask(), "none").on_eval(1, {"eval/loss": 99.0}) is False


def test_interrupted_trials_are_rerun_with_their_parameters(tmp_path: Path) -> None:
    """A trial left RUNNING by a killed invocation is failed (not counted) and its parameters are
    asked again, so the rerun resumes the same training run (named by its parameters)."""
    import optuna

    from memel.orchestration import load_job
    from memel.orchestration.optuna_storage import open_storage
    from memel.orchestration.study import _finished_count, _requeue_interrupted, suggest, trial_key

    job = load_job(JOBS / "tune_memel.yaml")
    study = optuna.create_study(study_name="r", storage=open_storage(f"journal:///{tmp_path / 'r.journal'}"))
    done = study.ask()
    suggest(done, job, job.tune)
    study.tell(done, 1.0)
    killed = study.ask()
    key = trial_key(suggest(killed, job, job.tune))
    assert _requeue_interrupted(study) == 1
    assert study.trials[killed.number].state.name == "FAIL" and _finished_count(study) == 1
    again = study.ask()
    assert trial_key(suggest(again, job, job.tune)) == key and again.params == killed.params


@pytest.mark.timeout(900)
def test_l2e_variant_trains_with_its_loss_term(tmp_path: Path) -> None:
    """jobs/l2e_vs_memel.yaml's L2E variant (threshold selection + log-MS loss) against original."""
    out = tmp_path / "l2e"
    args = [
        "run",
        str(JOBS / "l2e_vs_memel.yaml"),
        *TINY,
        "--set",
        "sweep.rungs=[byte-0.2m]",
        "--set",
        "sweep.seeds=[0]",
        "--set",
        "sweep.modes=[original, {mode: l2e, set: {inhibition.select: threshold}}]",
        "--set",
        f"output_dir={out}",
    ]
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 0, result.output
    with open(out / "sweep_table.csv") as handle:
        rows = {row["mode"]: row for row in csv.DictReader(handle)}
    assert float(rows["l2e"]["inhibited"]) > 0 and float(rows["original"]["inhibited"]) == 0
    # the loss pulls the selected values towards their neuron's mean: less monosemantic than original
    assert float(rows["l2e"]["ms_mean"]) < float(rows["original"]["ms_mean"])
    client = _client(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(rows["l2e"]["run_id"])
    assert run.data.tags["memel.mode"] == "l2e" and run.data.tags["memel.select"] == "threshold"
    assert run.data.params["inhibition.select"] == "threshold"


def test_launcher_starts_runs_only_while_their_workers_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Resource gating in isolation (the cluster's totals faked); the sweep test above runs it on real Ray."""
    import ray

    from memel.orchestration import load_job
    from memel.orchestration.launch import Launcher, demand
    from memel.training import TrainSpec

    spec = load_job(JOBS / "quickstart.yaml").base_tree()
    two_workers = TrainSpec(**spec)
    one_worker = TrainSpec(**{**spec, "train": {**spec["train"], "workers": 1}})
    assert demand(two_workers) == {"CPU": 2.0, "GPU": 0.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0})
    launcher = Launcher.__new__(Launcher)  # no Ray task needed to test the bookkeeping
    launcher.max_concurrent, launcher._running = None, {}
    assert launcher.has_room(two_workers), "the first run always goes"
    launcher._running["a"] = ("a", demand(two_workers))
    assert launcher.has_room(one_worker) and not launcher.has_room(two_workers)
    launcher._running["b"] = ("b", demand(one_worker))
    assert not launcher.has_room(one_worker)
    launcher.max_concurrent, launcher._running = 1, {"a": ("a", demand(one_worker))}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0})
    assert not launcher.has_room(one_worker), "max_concurrent caps runs in flight"


def test_ctrl_c_stops_the_wait_on_members_even_when_code_in_the_driver_swallowed_it() -> None:
    """On a real local Ray, with a member task that would run for a minute: a SIGINT whose
    KeyboardInterrupt some code swallowed still ends the driver's wait within a second or so, and
    one raised while it waits ends it too; the previous SIGINT handler is back afterwards."""
    import signal
    import threading
    import time

    import ray

    from memel.orchestration.launch import WAIT_POLL_S, Launcher, noting_interrupts
    from memel.training.runner import init_ray

    started_here = not ray.is_initialized()
    init_ray(None, 1)

    @ray.remote(num_cpus=0)
    def member() -> None:
        time.sleep(60)

    launcher = Launcher()
    before = signal.getsignal(signal.SIGINT)  # Ray Train's own, when an earlier run trained in this thread
    try:
        for swallowed in (True, False):
            launcher._running[member.remote()] = (f"swallowed={swallowed}", {"CPU": 0.0})
            with noting_interrupts():
                if swallowed:
                    try:
                        signal.raise_signal(signal.SIGINT)
                    except KeyboardInterrupt:
                        pass  # as a library's `except BaseException`, or a finalizer, would
                else:
                    threading.Timer(1.0, signal.raise_signal, (signal.SIGINT,)).start()
                began = time.perf_counter()
                with pytest.raises(KeyboardInterrupt):
                    launcher.wait_one()
                assert time.perf_counter() - began < 1.0 + 4 * WAIT_POLL_S + 2.0, swallowed
            assert signal.getsignal(signal.SIGINT) is before
            launcher.stop_all()
    finally:
        launcher.stop_all()
        if started_here:
            ray.shutdown()
