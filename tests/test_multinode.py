"""A sweep sent with ``memel submit`` to a real 3-node Ray cluster (a head and two worker nodes on
this machine, each its own raylet, object store and temp dir; the job goes through the head's Job
Submission API with the project as its working_dir): the members' workers are spread over both
worker nodes, every result lands in S3 (SeaweedFS) and on the MLflow server, and losing a worker
node mid-run ends with the same result as the uninterrupted sweep, resumed from the last S3
checkpoint on the node left, with no metric step or statistics row twice. The S3 secrets live in
the nodes' own environment only: they never reach the job's runtime_env or Ray's session folders."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest
from ray_cluster import OBJECT_STORE_BYTES, LocalCluster, local_cluster

from memel.redaction import is_secret_key
from memel.training.checkpoint_scan import SNAPSHOT_FILE

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "smoke.yaml"
BUCKET = "memel-multinode"
STEPS, EVERY = 12, 4
NEURONS, MODULES = 256, 4  # byte-0.2m with the `mlp` preset
#: The head runs only the drivers; node_b holds one worker of each member, node_a the other, and
#: node_a alone has room for every worker once node_b is gone.
NODES = {
    "head": {"num_cpus": 0, "resources": {"node_head": 1}},
    "node_a": {"num_cpus": 4, "resources": {"node_a": 1}},
    "node_b": {"num_cpus": 2, "resources": {"node_b": 1}},
}
RUN_TIMEOUT_S = 400  # the upload and the runtime_env set-up on each node included
MIN_MEMORY_GIB = 4
STATS_KEY = ["module", "step", "neuron"]
STATS_VALUES = [
    "mean",
    "var",
    "count",
    "batches",
    "selected_count",
    "inhibited_count",
    "max_ms",
    "mean_ms",
    "frac_above",
]

FRESH_ENV = "MEMEL_MULTINODE_FRESH"
#: Ray keeps the first cluster token a process reads: run where no earlier test has read one
#: (tests/test_multinode_fresh.py starts this file in a new interpreter).
pytestmark = pytest.mark.skipif(
    os.environ.get(FRESH_ENV) != "1", reason="runs in a fresh interpreter (test_multinode_fresh.py)"
)


def _why_no_cluster() -> str | None:
    """Why three Ray nodes and four training workers cannot run here, or None when they can."""
    try:
        import ray.cluster_utils  # noqa: F401
    except ImportError as error:
        return f"Ray is not installed ({error})"
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    if available < MIN_MEMORY_GIB:
        return f"{available:.1f} GiB of memory is free; three Ray nodes and four training workers need {MIN_MEMORY_GIB} GiB"
    shm = shutil.disk_usage("/dev/shm").free / 2**20 if Path("/dev/shm").is_dir() else 0
    if shm < 3 * OBJECT_STORE_BYTES / 2**20:
        return f"/dev/shm has {shm:.0f} MiB free; three Ray object stores need {3 * OBJECT_STORE_BYTES // 2**20} MiB"
    return None


@pytest.fixture(scope="module")
def cluster(s3_server) -> Iterator[LocalCluster]:
    """Three nodes, each with the S3 credentials in its own environment (as a cluster's secret would set)."""
    reason = _why_no_cluster()
    if reason:
        pytest.skip(f"Ray cannot start a 3-node cluster here: {reason}")
    with local_cluster(NODES, env=s3_server.env()) as handle:
        yield handle


def _args(cluster: LocalCluster, out: Path, prefix: str, mlflow_server: str) -> list[str]:
    """``memel submit --wait`` of jobs/smoke.yaml as a 2-member sweep (original and rd), its
    workers spread over the nodes, to the head's dashboard."""
    overrides = [
        "name=multinode",
        "sweep.rungs=[byte-0.2m]",
        "sweep.modes=[original, rd]",
        f"train.steps={STEPS}",
        "train.log_every=2",
        f"eval.every={STEPS}",
        "eval.batches=1",
        f"stats.every={EVERY}",
        f"checkpoint.every={EVERY}",
        "checkpoint.max_failures=2",
        "inhibition.late_start=3",
        "inhibition.forget_steps=3",
        "train.placement=SPREAD",
        f"checkpoint.storage=s3://{BUCKET}/{prefix}/checkpoints",
        f"stats.root=s3://{BUCKET}/{prefix}/stats",
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=multinode",
        f"output_dir={out}",
    ]
    return [
        sys.executable,
        "-m",
        "memel",
        "submit",
        str(SMOKE),
        "--address",
        cluster.dashboard,
        "--token-file",
        str(cluster.token_file),
        *(f"--set={o}" for o in overrides),
        "--wait",
    ]


def _submitter_env() -> dict[str, str]:
    """This process's environment without a secret (S3 keys, the cluster token) or RAY_ADDRESS: the
    S3 secrets are the nodes' own, and the token comes from --token-file."""
    env = {key: value for key, value in os.environ.items() if not is_secret_key(key) and key != "RAY_ADDRESS"}
    return {**env, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """``memel submit --wait`` from its own working folder."""
    work = log.parent / f"{log.stem}-cwd"
    work.mkdir()
    return subprocess.Popen(
        args, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=work, start_new_session=True, env=_submitter_env()
    )


def _finish(process: subprocess.Popen, log: Path) -> tuple[str, str]:
    """(the submitter's output, the submission id) once the job SUCCEEDED."""
    try:
        process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"memel submit --wait did not end in {RUN_TIMEOUT_S}s: {log.read_text()[-4000:]}")
    text = log.read_text()
    assert process.returncode == 0, text[-6000:]
    found = re.search(r"submitted (memel-multinode-[0-9a-f]{10})", " ".join(text.split()))
    assert found, text[-4000:]
    assert f"{found.group(1)} SUCCEEDED" in " ".join(text.split()), text[-4000:]
    return text, found.group(1)


def _check_job(cluster: LocalCluster, submission_id: str, secret: str) -> None:
    """The job ran its entrypoint on the head from the uploaded project, without a secret in its runtime_env."""
    from ray.job_submission import JobSubmissionClient

    sdk = JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {cluster.token}"})
    job = sdk.get_job_info(submission_id)
    assert str(job.status) == "SUCCEEDED" and job.entrypoint.startswith(
        "memel run jobs/smoke.yaml --set name=multinode"
    )
    assert job.runtime_env["working_dir"].startswith("gcs://"), "the project was uploaded"
    assert not [name for name in job.runtime_env.get("env_vars", {}) if is_secret_key(name)]
    assert secret not in json.dumps(job.runtime_env)
    assert list(cluster.node_folder("head").glob(f"ray/session_*/logs/job-driver-{submission_id}.log"))


def _secret_left_in_sessions(cluster: LocalCluster, secret: str) -> list[Path]:
    """The files Ray wrote in any node's session folders (its logs above all) that hold ``secret``."""
    return [path for name in NODES for path in cluster.session_files(name) if secret.encode() in path.read_bytes()]


def _checkpoints(s3_server, prefix: str) -> set[str]:
    """The checkpoint folders stored so far under ``prefix``, as ``<run name>/<checkpoint>``."""
    start = f"{prefix}/checkpoints/"
    keys = [
        item["Key"][len(start) :]
        for item in s3_server.client().list_objects_v2(Bucket=BUCKET, Prefix=start).get("Contents", [])
    ]
    return {
        "/".join(key.split("/")[:2])
        for key in keys
        if key.count("/") >= 2 and key.split("/")[1].startswith("checkpoint_")
    }


def _recorded(s3_server, prefix: str) -> bool:
    """Whether Ray Train has recorded a checkpoint of some member in S3 (its resume point)."""
    start = f"{prefix}/checkpoints/"
    listed = s3_server.client().list_objects_v2(Bucket=BUCKET, Prefix=start).get("Contents", [])
    return any(item["Key"].endswith(f"/{SNAPSHOT_FILE}") for item in listed)


def _stats(s3_server, prefix: str):
    from pyarrow import fs

    s3 = fs.S3FileSystem(
        endpoint_override=s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region=s3_server.region,
    )
    return ds.dataset(f"{BUCKET}/{prefix}/stats", filesystem=s3, partitioning="hive").to_table().to_pandas()


def _members(mlflow_server: str, out: Path) -> dict[str, Any]:
    """The sweep's child runs on the MLflow server, by member key."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    parent_id = json.loads((out / "sweep.json").read_text())["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {child.data.tags["memel.member"]: child for child in children}


def _check_complete(mlflow_server: str, s3_server, out: Path, prefix: str) -> tuple[dict[str, Any], Any]:
    """Every member's metrics (each step once) on MLflow and statistics (each row once) in S3."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    members = _members(mlflow_server, out)
    assert sorted(members) == ["byte-0.2m-original", "byte-0.2m-rd"]
    for run in members.values():
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == list(range(2, STEPS + 1, 2)), f"each logged step exactly once: {steps}"
    stats = _stats(s3_server, prefix)
    assert set(stats["run_id"]) == {run.info.run_id for run in members.values()}
    assert not stats.duplicated(["run_id", *STATS_KEY]).any(), "no statistics row twice"
    assert len(stats) == 2 * (STEPS // EVERY) * MODULES * NEURONS
    assert len({folder.split("/")[0] for folder in _checkpoints(s3_server, prefix)}) == 2, (
        "each member's checkpoints in S3"
    )
    return members, stats


def _ran_train_workers(cluster: LocalCluster, node: str) -> bool:
    return any(
        ":actor_name:RayTrainWorker" in log.read_text(errors="replace")[:400] for log in cluster.worker_logs(node)
    )


@pytest.mark.timeout(900)
def test_sweep_spreads_over_nodes_and_survives_losing_one(
    cluster: LocalCluster, tmp_path: Path, mlflow_server: str, s3_server
) -> None:
    if BUCKET not in {bucket["Name"] for bucket in s3_server.client().list_buckets()["Buckets"]}:
        s3_server.client().create_bucket(Bucket=BUCKET)
    tag, secret = uuid.uuid4().hex[:8], s3_server.secret_key
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") == secret, "the nodes (started from this process) hold the secret"

    # the whole sweep on three nodes: the reference
    whole_log = tmp_path / "whole.log"
    whole_text, whole_id = _finish(
        _start(_args(cluster, tmp_path / "whole", f"{tag}/whole", mlflow_server), whole_log), whole_log
    )
    _check_job(cluster, whole_id, secret)
    assert _ran_train_workers(cluster, "node_a") and _ran_train_workers(cluster, "node_b"), (
        "workers on both worker nodes"
    )
    assert not _ran_train_workers(cluster, "head")
    whole, whole_stats = _check_complete(mlflow_server, s3_server, tmp_path / "whole", f"{tag}/whole")

    # the same sweep again; node_b is taken away once a checkpoint is in S3
    lost_log = tmp_path / "lost.log"
    process = _start(_args(cluster, tmp_path / "lost", f"{tag}/lost", mlflow_server), lost_log)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not _recorded(s3_server, f"{tag}/lost"):
        assert process.poll() is None, lost_log.read_text()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint reached S3"
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before the node could be lost"
    cluster.lose("node_b")
    shown, lost_id = _finish(process, lost_log)
    _check_job(cluster, lost_id, secret)
    assert "The actor died because its node has died" in shown, "the lost node failed the runs"
    resumed = cluster.worker_lines("node_a", "[memel] resumed from step")
    assert resumed, "the restarted workers resumed from the checkpoint in S3 (on the node left)"
    lost, lost_stats = _check_complete(mlflow_server, s3_server, tmp_path / "lost", f"{tag}/lost")
    assert secret not in whole_text + shown, "the submitter never shows the secret"
    assert not _secret_left_in_sessions(cluster, secret), "the S3 secret is in Ray's session folders"

    # the same result: final loss and every statistics snapshot of every member
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    for key in whole:
        a = client.get_metric_history(whole[key].info.run_id, "train/loss")
        b = client.get_metric_history(lost[key].info.run_id, "train/loss")
        assert [m.value for m in b] == pytest.approx([m.value for m in a], rel=1e-6), key
        a_rows = whole_stats[whole_stats["run_id"] == whole[key].info.run_id].sort_values(STATS_KEY)
        b_rows = lost_stats[lost_stats["run_id"] == lost[key].info.run_id].sort_values(STATS_KEY)
        assert a_rows[STATS_KEY].values.tolist() == b_rows[STATS_KEY].values.tolist()
        for column in STATS_VALUES:
            assert b_rows[column].tolist() == pytest.approx(a_rows[column].tolist(), rel=1e-5, abs=1e-6), (key, column)
