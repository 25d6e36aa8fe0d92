"""MLflow tracking against a real server and a local store; preflight; delivery through an outage."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tcp_proxy import TcpProxy

from memel.errors import ConfigError
from memel.tracking import (
    ConsoleTracker,
    MlflowTracker,
    Tracker,
    check_tracking_uri,
    default_tracking_uri,
    flatten,
)

PARAMS = {
    "model": {"name": "byte-0.2m", "layers": 2},
    "inhibition": {"mode": "rd", "strength": 1.0, "targets": ["layers.*.mlp.act"]},
    "storage": {"aws_secret_access_key": "sk-DO-NOT-LOG", "api_token": "tok-DO-NOT-LOG", "bucket": "b"},
    "db_password": "pw-DO-NOT-LOG",
    "notes": "x" * 7000,
}


def test_flatten_and_secret_filter() -> None:
    flat = flatten(PARAMS)
    assert flat["model.name"] == "byte-0.2m" and flat["model.layers"] == "2"
    assert flat["inhibition.targets"] == '["layers.*.mlp.act"]'
    assert flat["storage.aws_secret_access_key"] == "sk-DO-NOT-LOG"  # flatten keeps all; the trackers filter


def test_run_on_a_real_server(mlflow_server: str, tmp_path: Path) -> None:
    parent = MlflowTracker(mlflow_server, "memel-test", run_name="sweep")
    parent_id = parent.start()
    tracker = MlflowTracker(mlflow_server, "memel-test", run_name="trial-0", parent_run_id=parent_id)
    assert isinstance(tracker, Tracker)
    run_id = tracker.start()
    assert tracker.start() == run_id  # created once
    tracker.log_params(PARAMS)
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step * 10)
    tracker.set_tags({"memel.mode": "rd"})
    tracker.log_dict({"neurons": [1, 2, 3]}, "summary/neurons.json")
    tracker.log_text("hello", "notes.txt")
    (tmp_path / "config.yaml").write_text("a: 1\n")
    tracker.log_artifact(str(tmp_path / "config.yaml"))
    tracker.end()
    parent.end()

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    params = run.data.params
    assert params["model.name"] == "byte-0.2m" and params["inhibition.mode"] == "rd" and params["storage.bucket"] == "b"
    assert len(params["notes"]) == 6000
    assert not [k for k in params if "secret" in k or "token" in k or "password" in k]
    assert "DO-NOT-LOG" not in str(params)
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (s * 10, 1.0 / (s + 1)) for s in range(5)
    ]
    assert run.data.tags["memel.mode"] == "rd"
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert run.info.status == "FINISHED"
    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert [r.info.run_id for r in children] == [run_id]
    downloaded = Path(client.download_artifacts(run_id, "summary/neurons.json", str(tmp_path)))
    assert downloaded.read_text().replace(" ", "").replace("\n", "") == '{"neurons":[1,2,3]}'
    assert {a.path for a in client.list_artifacts(run_id)} >= {"summary", "notes.txt", "config.yaml"}

    resumed = MlflowTracker(mlflow_server, "memel-test", run_id=run_id)
    assert resumed.start() == run_id
    resumed.log_metrics({"loss": 0.01}, step=100)
    resumed.end("KILLED")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"  # a finished run keeps its status whatever a rerun of it does
    assert max(m.step for m in client.get_metric_history(run_id, "loss")) == 100


def test_default_local_store_needs_no_server(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path / "out")
    assert uri == f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}"
    check_tracking_uri(uri)
    a = MlflowTracker(uri, "local")
    b = MlflowTracker(default_tracking_uri(tmp_path / "other"), "local")  # two stores in one process
    run_a, run_b = a.start(), b.start()
    a.log_params({"x": 1})
    a.log_metrics({"m": 2.0}, step=3)
    a.log_dict({"k": "v"}, "d.json")
    b.log_metrics({"m": 5.0}, step=1)
    a.end()
    b.end()
    client = MlflowClient(uri)
    assert client.get_run(run_a).data.params == {"x": "1"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_a, "m")] == [(3, 2.0)]
    assert [m.value for m in MlflowClient(default_tracking_uri(tmp_path / "other")).get_metric_history(run_b, "m")] == [
        5.0
    ]
    artifacts = list((tmp_path / "out" / "mlartifacts").rglob("d.json"))
    assert len(artifacts) == 1  # artifacts inside the output folder, not the working directory
    assert not (Path.cwd() / "mlruns").exists() or (Path.cwd() / "mlruns").stat().st_mtime < time.time() - 600


def test_preflight_errors(tmp_path: Path, mlflow_server: str) -> None:
    check_tracking_uri(mlflow_server)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"tracking\.uri.*unreachable"):
        check_tracking_uri("http://user:hunter2@127.0.0.1:9")
    assert time.perf_counter() - start < 10
    try:
        check_tracking_uri("http://user:hunter2@127.0.0.1:9")
    except ConfigError as error:
        assert "hunter2" not in str(error)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"tracking\.uri.*not writable"):
        check_tracking_uri(default_tracking_uri(blocker / "out"))
    with pytest.raises(ConfigError, match=r"tracking\.uri"):
        check_tracking_uri("ftp://somewhere")


def test_metrics_survive_a_server_outage(
    mlflow_server: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast; the tracker's own backoff retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    proxy = TcpProxy(int(mlflow_server.rsplit(":", 1)[1])).start()
    try:
        tracker = MlflowTracker(proxy.url, "memel-outage")
        run_id = tracker.start()
        tracker.log_metrics({"loss": 0.0}, step=0)
        assert tracker.flush(timeout=30)
        proxy.stop()
        with caplog.at_level(logging.WARNING, logger="memel.tracking"):
            start = time.perf_counter()
            for step in range(1, 6):
                tracker.log_metrics({"loss": float(step)}, step=step)  # must neither raise nor block
            assert time.perf_counter() - start < 0.5
            assert not tracker.flush(timeout=2)
            assert "unreachable" in caplog.text
            proxy.start()
            assert tracker.flush(timeout=60)
        tracker.end()
    finally:
        proxy.stop()
    history = MlflowClient(mlflow_server).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(6))


def test_console_tracker_is_a_tracker(caplog: pytest.LogCaptureFixture) -> None:
    tracker = ConsoleTracker("demo")
    assert isinstance(tracker, Tracker)
    with caplog.at_level(logging.INFO, logger="memel.tracking"):
        tracker.start()
        tracker.log_params(PARAMS)
        tracker.log_metrics({"loss": 1.5}, step=2)
        tracker.end()
    assert "model.name = byte-0.2m" in caplog.text and "loss=1.5" in caplog.text
    assert "DO-NOT-LOG" not in caplog.text


def test_a_resumed_run_never_gets_a_metric_step_twice(tmp_path: Path) -> None:
    """A resumed run replays the steps after its last checkpoint: what the run already holds is not sent again."""
    uri = default_tracking_uri(tmp_path)
    first = MlflowTracker(uri, "replay")
    run_id = first.start()
    for step in range(1, 9):
        first.log_metrics({"train/loss": float(step), "eval/loss": 10.0 + step}, step)
    assert first.flush(timeout=30)  # killed here: no end()

    replay = MlflowTracker(uri, "replay", run_id=run_id)
    replay.start()
    for step in range(5, 13):  # resumed from the checkpoint of step 4
        replay.log_metrics({"train/loss": float(step), "eval/loss": 10.0 + step, "new/key": 1.0}, step)
    replay.end()
    client = MlflowClient(uri)
    for key, offset in (("train/loss", 0.0), ("eval/loss", 10.0)):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == [(s, offset + s) for s in range(1, 13)], key
    assert sorted(m.step for m in client.get_metric_history(run_id, "new/key")) == list(range(5, 13))


def test_a_finished_run_stays_finished_when_a_rerun_fails(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path)
    first = MlflowTracker(uri, "rerun")
    run_id = first.start()
    first.end("FINISHED")
    rerun = MlflowTracker(uri, "rerun", run_id=run_id)
    rerun.start()
    rerun.end("FAILED")
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"
    unfinished = MlflowTracker(uri, "rerun")
    other = unfinished.start()
    MlflowTracker(uri, "rerun", run_id=other).start()  # an interrupted run resumed ...
    again = MlflowTracker(uri, "rerun", run_id=other)
    again.start()
    again.end("KILLED")  # ... may end KILLED
    assert MlflowClient(uri).get_run(other).info.status == "KILLED"


def test_a_checkpoint_during_an_outage_waits_only_output_wait_s_and_loses_nothing(
    mlflow_server: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the MLflow server down, the wait before a checkpoint ends after ``checkpoint.output_wait_s``
    with a warning; the metrics stay queued and all reach the server once it is back."""
    from memel.training.callbacks import TrackerCallback

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    proxy = TcpProxy(int(mlflow_server.rsplit(":", 1)[1])).start()
    try:
        tracker = MlflowTracker(proxy.url, "memel-checkpoint-wait")
        run_id = tracker.start()
        callback = TrackerCallback(tracker, checkpoint_wait=1.5)
        callback.on_log(1, {"loss": 1.0})
        callback.on_checkpoint(1, Path("unused"), {})
        assert "warning" not in capsys.readouterr().out, "delivered: no warning"
        proxy.stop()
        for step in range(2, 5):
            callback.on_log(step, {"loss": float(step)})
        start = time.perf_counter()
        callback.on_checkpoint(4, Path("unused"), {})
        waited = time.perf_counter() - start
        assert 1.5 <= waited < 5, waited
        shown = capsys.readouterr().out
        assert "step 4 checkpointed before its metrics were stored" in shown and "checkpoint.output_wait_s" in shown
        proxy.start()
        assert tracker.flush(timeout=60)
        tracker.end()
    finally:
        proxy.stop()
    history = MlflowClient(mlflow_server).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
