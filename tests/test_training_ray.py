"""Real 2-worker Ray Train + DeepSpeed runs on CPU (gloo): ZeRO 2 and 3, MLflow, Parquet, resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch

from memel.errors import ConfigError
from memel.training import load_spec, run_training
from memel.training.callbacks import FAULT_MARKER_ENV, FAULT_STEP_ENV, STEP_TIMES_ENV
from memel.training.lr_schedule import lr_factor

SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"
NEURONS, MODULES = 256, 4  # byte-0.2m: MLP width 4 x 64, 4 layers with the `mlp` preset


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def _spec(tmp: Path, *extra: str, steps: int = 12):
    return load_spec(
        SMOKE,
        [
            f"output_dir={tmp}",
            f"train.steps={steps}",
            "train.log_every=2",
            "eval.every=6",
            "eval.batches=1",
            "stats.every=4",
            "checkpoint.every=4",
            "inhibition.late_start=3",
            "inhibition.forget_steps=3",
            *extra,
        ],
    )


def _metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(tracking_uri).get_metric_history(run_id, key)]


def _final_inhibition(checkpoint: str) -> dict:
    return torch.load(Path(checkpoint) / "memel" / "inhibition.pt", weights_only=False)


def _read_stats(root: str, s3=None):
    """The statistics dataset, read with pyarrow alone (no memel code)."""
    if s3 is None:
        return ds.dataset(root, partitioning="hive").to_table()
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        endpoint_override=s3.endpoint,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        region=s3.region,
        scheme="http",
    )
    return ds.dataset(root.removeprefix("s3://"), filesystem=fs, partitioning="hive").to_table()


@pytest.mark.parametrize(("stage", "on_s3"), [(2, False), (3, True)])
def test_two_worker_run_trains_tracks_and_writes_statistics(
    local_ray, tmp_path: Path, mlflow_server, request, monkeypatch, stage: int, on_s3: bool
) -> None:
    extra = [f"train.zero_stage={stage}", f"tracking.uri={mlflow_server}", "tracking.experiment=ci"]
    s3 = None
    if on_s3:
        s3 = request.getfixturevalue("s3_server")
        for key, value in s3.env().items():
            monkeypatch.setenv(key, value)
        extra.append(f"stats.root=s3://memel-train/{tmp_path.name}")
    result = run_training(_spec(tmp_path, *extra))

    losses = _metric_history(result.tracking_uri, result.run_id, "train/loss")
    assert [step for step, _ in losses] == [2, 4, 6, 8, 10, 12]
    assert losses[-1][1] < losses[0][1], "the loss must fall"
    divergence = _metric_history(result.tracking_uri, result.run_id, "stats/rank_divergence")
    assert len(divergence) == 3 and all(value == 0.0 for _, value in divergence), "ranks must hold identical statistics"
    assert _metric_history(result.tracking_uri, result.run_id, "inhibited/layers.3.mlp.act")[-1][1] > 0

    from mlflow import MlflowClient

    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.zero_stage"] == str(stage) and run.data.params["inhibition.mode"] == "rd"
    assert run.data.tags["memel.model"] == "byte-0.2m" and run.data.tags["memel.n_params"] == "232832"
    tags, params = run.data.tags, run.data.params  # where inhibition went and how it selected
    assert (tags["memel.layout"], tags["memel.preset"], tags["memel.select"]) == ("channel", "mlp", "top_n")
    assert (params["inhibition.layout"], params["model.preset"], params["inhibition.top_n"]) == ("channel", "mlp", "1")
    assert {
        "eval/loss",
        "eval/perplexity",
        "train/tokens_per_s",
        "train/step_time_s",
        "ms/layers.0.mlp.act/mean",
    } <= set(run.data.metrics)

    table = _read_stats(result.stats_root, s3)
    assert table.num_rows == 3 * MODULES * NEURONS  # snapshots at steps 4, 8, 12
    assert sorted(set(table.column("step").to_pylist())) == [4, 8, 12]
    assert {
        (r["layout"], r["preset"], r["select"]) for r in table.select(["layout", "preset", "select"]).to_pylist()
    } == {("channel", "mlp", "top_n")}
    final = _final_inhibition(result.checkpoint)
    last = table.filter(ds.field("step") == 12).to_pandas()
    for name, state in final.items():
        rows = last[last["module"] == name].sort_values("neuron")
        assert rows["mean"].tolist() == pytest.approx(state["mean"].tolist(), rel=1e-6, abs=1e-7)
        assert rows["count"].tolist() == state["count"].tolist()


def test_killed_worker_resumes_to_the_same_result(local_ray, tmp_path: Path, monkeypatch) -> None:
    """Also with a warmup and cosine decay: the resumed run continues the lr curve where it stopped."""
    schedule = ("train.lr_schedule=cosine", "train.warmup_steps=3", "train.min_lr_ratio=0.2")
    reference = run_training(_spec(tmp_path / "whole", *schedule, steps=10))
    monkeypatch.setenv(FAULT_STEP_ENV, "6")
    monkeypatch.setenv(FAULT_MARKER_ENV, str(tmp_path / "killed.txt"))
    resumed = run_training(_spec(tmp_path / "faulted", *schedule, steps=10))
    assert (tmp_path / "killed.txt").exists(), "the fault was never injected"
    assert resumed.metrics["step"] == reference.metrics["step"] == 10
    assert resumed.metrics["train/loss"] == pytest.approx(reference.metrics["train/loss"], rel=1e-6)
    lr = _spec(tmp_path, *schedule).train.lr  # logged after step s: the lr of the next step, s (0-based)
    expected = [(s, lr * lr_factor(s, warmup=3, total=10, schedule="cosine", min_ratio=0.2)) for s in (2, 4, 6, 8, 10)]
    for run in (reference, resumed):
        logged = _metric_history(run.tracking_uri, run.run_id, "train/lr")
        assert sorted(logged) == pytest.approx(expected, rel=1e-6)
    a, b = _final_inhibition(reference.checkpoint), _final_inhibition(resumed.checkpoint)
    for name in a:
        for key in ("mean", "var", "count", "batches"):
            assert torch.equal(a[name][key], b[name][key]), (name, key)

    # the same spec again resumes the finished run instead of starting over
    monkeypatch.delenv(FAULT_STEP_ENV)
    again = run_training(_spec(tmp_path / "whole", *schedule, steps=10))
    assert again.run_id == reference.run_id
    assert _metric_history(again.tracking_uri, again.run_id, "train/loss")[-1][0] == 10
    assert len(_metric_history(again.tracking_uri, again.run_id, "train/loss")) == 5


def test_a_run_with_sharded_statistics_resumes_each_rank_from_its_own_shard(
    local_ray, tmp_path: Path, monkeypatch
) -> None:
    """``inhibition.shard_statistics``: 2 workers each hold half of every module's statistics;
    killed and resumed, each rank reloads its own shard and the run ends as the uninterrupted
    one (loss, every shard's statistics); the snapshots hold every neuron once."""
    sharded = ("inhibition.shard_statistics=true",)
    reference = run_training(_spec(tmp_path / "whole", *sharded, steps=10))
    monkeypatch.setenv(FAULT_STEP_ENV, "6")
    monkeypatch.setenv(FAULT_MARKER_ENV, str(tmp_path / "killed.txt"))
    resumed = run_training(_spec(tmp_path / "faulted", *sharded, steps=10))
    assert (tmp_path / "killed.txt").exists(), "the fault was never injected"
    assert resumed.metrics["train/loss"] == pytest.approx(reference.metrics["train/loss"], rel=1e-6)
    for rank in range(2):
        name = f"inhibition-rank{rank}.pt"
        a = torch.load(Path(reference.checkpoint) / "memel" / name, weights_only=False)
        b = torch.load(Path(resumed.checkpoint) / "memel" / name, weights_only=False)
        for module in a:
            assert a[module]["mean"].numel() == NEURONS // 2  # a shard, not the whole
            assert a[module]["shard"].tolist() == [NEURONS, 2, rank]
            for key in ("mean", "var", "count", "batches", "window_counts"):
                assert torch.equal(a[module][key], b[module][key]), (rank, module, key)
    table = _read_stats(reference.stats_root).to_pandas()
    last = table[table["step"] == table["step"].max()]
    assert len(last) == MODULES * NEURONS and not last.duplicated(["module", "neuron"]).any()


def test_a_resumed_run_evaluates_on_the_same_heldout_batches(local_ray, tmp_path: Path, monkeypatch) -> None:
    """Every periodic evaluation scores the same fixed held-out batches: killed after step 6 and
    resumed from step 4, the run's eval metrics equal the uninterrupted run's at every step."""
    extra = ("eval.every=2", "eval.batches=1")
    reference = run_training(_spec(tmp_path / "whole", *extra, steps=10))
    monkeypatch.setenv(FAULT_STEP_ENV, "6")
    monkeypatch.setenv(FAULT_MARKER_ENV, str(tmp_path / "killed.txt"))
    resumed = run_training(_spec(tmp_path / "faulted", *extra, steps=10))
    assert (tmp_path / "killed.txt").exists(), "the fault was never injected"
    for key in ("eval/loss", "eval/perplexity", "train/loss"):
        whole = _metric_history(reference.tracking_uri, reference.run_id, key)
        got = _metric_history(resumed.tracking_uri, resumed.run_id, key)
        assert [step for step, _ in got] == [step for step, _ in whole], key
        assert [value for _, value in got] == pytest.approx([value for _, value in whole], rel=1e-6), key


def test_unreachable_outputs_fail_before_any_worker_starts(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="tracking.uri"):
        run_training(_spec(tmp_path, "tracking.uri=http://127.0.0.1:9"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unused")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unused")
    with pytest.raises(ConfigError, match="stats.root"):
        run_training(_spec(tmp_path, "stats.root=s3://bucket/stats"))
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "run.json").exists()


def test_a_corrupt_latest_checkpoint_and_an_empty_ray_record_resume_from_the_last_good_one(
    local_ray, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A full disk leaves Ray's checkpoint record empty and the newest checkpoint truncated: the rerun
    moves the record aside, skips the truncated checkpoint, resumes from the one before, and ends
    with the same result, no metric step or statistics row twice, and the run still FINISHED."""
    from mlflow import MlflowClient

    from memel.training.checkpoint_scan import SNAPSHOT_FILE

    spec = _spec(tmp_path, "checkpoint.every=4", "stats.every=2", steps=8)
    first = run_training(spec)
    folder = Path(first.checkpoint)
    model_states = next(folder.glob("step-*/mp_rank_00_model_states.pt"))
    model_states.write_bytes(model_states.read_bytes()[:1000])
    snapshot = folder.parent / SNAPSHOT_FILE
    snapshot.write_bytes(b"")
    capfd.readouterr()

    again = run_training(spec)
    shown = capfd.readouterr().out
    assert "moved it to" in shown and f"checkpoint {folder.name} is incomplete" in shown
    assert "resuming from the checkpoint of step 4" in shown
    assert again.run_id == first.run_id and again.metrics["step"] == 8
    assert again.metrics["train/loss"] == pytest.approx(first.metrics["train/loss"], rel=1e-6)
    client = MlflowClient(again.tracking_uri)
    assert client.get_run(again.run_id).info.status == "FINISHED"
    steps = [s for s, _ in _metric_history(again.tracking_uri, again.run_id, "train/loss")]
    assert sorted(steps) == [2, 4, 6, 8]
    stats = _read_stats(again.stats_root).to_pandas()
    assert not stats.duplicated(["run_id", "module", "step", "neuron"]).any()
    assert len(stats) == 4 * MODULES * NEURONS
    assert list(folder.parent.glob(f"{SNAPSHOT_FILE}.corrupt-*"))


def test_a_killed_worker_resumes_from_the_checkpoint_written_just_before(
    local_ray, tmp_path: Path, monkeypatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Killed one step after a checkpoint (before Ray Train has registered it), the restarted
    workers resume from that checkpoint, not from an older one or from scratch."""
    monkeypatch.setenv(FAULT_STEP_ENV, "5")
    monkeypatch.setenv(FAULT_MARKER_ENV, str(tmp_path / "killed.txt"))
    result = run_training(_spec(tmp_path / "run", "checkpoint.every=4", steps=6))
    assert (tmp_path / "killed.txt").exists(), "the fault was never injected"
    assert result.metrics["step"] == 6
    time.sleep(2)  # the workers' output reaches the driver asynchronously
    shown = capfd.readouterr().out
    assert "[memel] resumed from step 4" in shown, shown[-2000:]
    steps = [s for s, _ in _metric_history(result.tracking_uri, result.run_id, "train/loss")]
    assert sorted(steps) == [2, 4, 6]


def test_each_progress_line_is_printed_once(tmp_path: Path) -> None:
    """``memel train`` as a user runs it: rank 0's progress reaches the terminal once per log
    (Ray Train's print patch used to log each line a second time through the root logger)."""
    import os
    import subprocess
    import sys

    overrides = [
        f"output_dir={tmp_path}",
        "train.steps=4",
        "train.log_every=2",
        "eval.every=4",
        "stats.every=4",
        "checkpoint.every=4",
    ]
    command = [sys.executable, "-m", "memel", "train", str(SMOKE), *(arg for o in overrides for arg in ("--set", o))]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "platform")}
    env[STEP_TIMES_ENV] = str(tmp_path / "step-times.json")  # reaches rank 0 through Ray's runtime env
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr
    for step in (2, 4):
        assert output.count(f"[memel] step {step}/4 loss") == 1, output[-3000:]
    times = json.loads((tmp_path / "step-times.json").read_text())
    assert times["steps"] == [2, 3, 4] and all(seconds > 0 for seconds in times["seconds"])


def test_the_embedded_ray_runs_its_workers_at_the_driver_s_priority() -> None:
    """Ray's default niceness of 15 would give every other process on the machine (Ray's own
    daemons included) precedence over the training workers."""
    import os
    import subprocess
    import sys

    code = (
        "import os, ray\n"
        "from memel.training.runner import start_embedded_ray\n"
        "start_embedded_ray(1)\n"
        "print('niceness', ray.get(ray.remote(lambda: os.nice(0)).remote()), os.nice(0))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "platform")}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    driver = os.nice(0)
    assert f"niceness {driver} {driver}" in done.stdout, done.stdout[-3000:]


def test_a_diverged_run_fails_with_one_error_line(tmp_path: Path) -> None:
    """``memel train`` with a learning rate that blows the loss up: every rank stops at the same
    log step, the command exits 1 with one ``error:`` line, and the MLflow run ends FAILED. With
    ``checkpoint.max_failures=2`` it is still one attempt: Ray Train restarts workers that raise,
    and a diverged run must not be trained (and diverge) again."""
    import json
    import os
    import re
    import subprocess
    import sys

    from mlflow import MlflowClient

    overrides = [
        f"output_dir={tmp_path}",
        "train.lr=1e30",
        "train.steps=8",
        "train.log_every=2",
        "eval.every=8",
        "stats.every=8",
        "checkpoint.every=8",
        "checkpoint.max_failures=2",
    ]
    command = [sys.executable, "-m", "memel", "train", str(SMOKE), *(arg for o in overrides for arg in ("--set", o))]
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "platform"),
        "COLUMNS": "300",
        "RAY_DEDUP_LOGS": "0",
    }
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    assert errors[0].startswith("error: the run failed: training loss became non-finite at step "), errors
    assert "lower train.lr" in errors[0], errors
    run = json.loads((tmp_path / "run.json").read_text())
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run["run_id"]).info.status == "FAILED"
    assert not (tmp_path / "summary.json").exists(), "a failed run writes no summary"
    # one attempt: one worker group of 2 (a restart starts new worker processes), no retry decision
    workers = set(re.findall(r"\(RayTrainWorker pid=(\d+)", output))
    assert len(workers) == 2, (workers, output[-3000:])
    assert "RETRY" not in output and "Restarting" not in output, output[-3000:]


def _lag_ray_record(storage: str, run_name: str) -> str:
    """Rewrite Ray's record of a run on ``storage`` as it was before its newest checkpoint was
    registered (its oldest checkpoint only); returns that checkpoint's folder name."""
    import json

    from memel.training.checkpoint_scan import SNAPSHOT_FILE, run_folder

    run = run_folder(storage, run_name)
    record = json.loads(run.read_text(SNAPSHOT_FILE))
    results = record["checkpoint_results"]
    steps = [json.loads(run.read_text(r["checkpoint_dir_name"], "memel", "progress.json"))["step"] for r in results]
    oldest = steps.index(min(steps))
    record["checkpoint_results"] = [results[oldest]]
    record["checkpoint_report_indices"] = [record["checkpoint_report_indices"][oldest]]
    record["latest_checkpoint_result"] = results[oldest]
    with run.fs.open_output_stream(run.join(SNAPSHOT_FILE)) as handle:
        handle.write(json.dumps(record).encode())
    return results[oldest]["checkpoint_dir_name"]


def _memel_train(out: Path, env: dict[str, str], *overrides: str):
    """``memel train`` of the smoke job in a fresh interpreter (its embedded Ray inherits ``env``)."""
    import os
    import subprocess
    import sys

    settings = [f"output_dir={out}", "train.log_every=2", "eval.every=6", "eval.batches=1", "stats.every=2"]
    command = [sys.executable, "-m", "memel", "train", str(SMOKE)]
    command += [arg for setting in [*settings, *overrides] for arg in ("--set", setting)]
    full_env = {**os.environ, **env, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "platform")}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=full_env, check=False)


def test_on_s3_a_run_resumes_from_its_newest_checkpoint_and_keeps_only_checkpoint_keep(
    tmp_path: Path, s3_server
) -> None:
    """Checkpoints in S3: a run killed after its step-4 checkpoint, whose Ray record still ends at
    step 2, resumes from step 4 (no step replayed), and the checkpoints Ray does not track are
    pruned to ``checkpoint.keep``."""
    import json

    import pyarrow.fs as pafs
    from s3_server import s3_env

    from memel.training.checkpoint_scan import SNAPSHOT_FILE, run_folder, scan_run

    if "memel-train" not in {bucket["Name"] for bucket in s3_server.client().list_buckets()["Buckets"]}:
        s3_server.client().create_bucket(Bucket="memel-train")
    storage = f"s3://memel-train/{tmp_path.name}-checkpoints"
    settings = ("train.steps=6", "checkpoint.every=2", f"checkpoint.storage={storage}", "checkpoint.max_failures=0")
    fault = {FAULT_STEP_ENV: "5", FAULT_MARKER_ENV: str(tmp_path / "killed.txt")}
    out = tmp_path / "run"
    first = _memel_train(out, {**s3_server.env(), **fault}, *settings, "checkpoint.keep=5")
    assert first.returncode != 0 and (tmp_path / "killed.txt").exists(), first.stdout[-3000:] + first.stderr[-3000:]
    run_name = json.loads((out / "run.json").read_text())["run_name"]
    with s3_env(s3_server):
        lagging = _lag_ray_record(storage, run_name)
        run = run_folder(storage, run_name)
        assert [found.step for found in scan_run(run, 2).complete] == [4, 2]

    again = _memel_train(out, s3_server.env(), *settings, "checkpoint.keep=2")
    shown = again.stdout + again.stderr
    assert again.returncode == 0, shown[-5000:]
    assert "resuming from the checkpoint of step 4" in shown and "[memel] resumed from step 4" in shown, shown[-3000:]
    assert f"its latest: {lagging}" in shown
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["step"] == 6
    steps = [s for s, _ in _metric_history(summary["tracking_uri"], summary["run_id"], "train/loss")]
    assert sorted(steps) == [2, 4, 6], "no step trained twice"
    with s3_env(s3_server):
        run = run_folder(storage, run_name)
        kept = scan_run(run, 2)
        assert [found.step for found in kept.complete] == [6, 4], "checkpoint.keep=2, the step-2 one pruned"
        assert not kept.skipped
        listed = run.fs.get_file_info(pafs.FileSelector(run.path))
        assert any(info.base_name.startswith(f"{SNAPSHOT_FILE}.stale-") for info in listed)
