"""``memel submit/status/logs/stop``: the plan built locally (runtime_env, id, token lookup, early
refusal) and a real ``ray start --head`` with token authentication running jobs/smoke.yaml."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import ClassVar

import pytest
from typer.testing import CliRunner

from memel.cli import app
from memel.services.ports import free_ports
from memel.submission import (
    DEFAULT_EXCLUDES,
    ClusterToken,
    SubmissionError,
    SubmitRequest,
    entrypoint,
    find_project_root,
    find_token,
    pinned_requirements,
    plan_job,
    submission_id,
)
from memel.submission.client import resolve_address

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "smoke.yaml"
RUNNER = CliRunner(env={"COLUMNS": "200"})
CLUSTER_OUTPUTS = ["tracking.uri=http://mlflow.example:5000", "stats.root=s3://bucket/prefix"]
SMALL = [
    "train.steps=4",
    "train.workers=1",
    "train.global_batch_size=4",
    "eval.every=2",
    "eval.batches=1",
    "stats.every=2",
    "checkpoint.every=2",
    "train.log_every=2",
]


def _flat(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------
# The plan, built without a cluster
# ----------------------------------------------------------------------------------------------


def test_runtime_env_ships_the_project_and_forwards_only_what_is_set() -> None:
    environ = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t",
        "MY_FLAG": "1",
        "HOME": "/x",
    }
    plan = plan_job(SubmitRequest(SMOKE, "http://head:8265", "train", tuple(CLUSTER_OUTPUTS), ("MY_FLAG",)), environ)
    env = plan.runtime_env
    assert env["working_dir"] == str(ROOT)
    assert env["excludes"][: len(DEFAULT_EXCLUDES)] == list(DEFAULT_EXCLUDES)  # then files git does not track
    assert {".git", "/runs", "__pycache__"} <= set(env["excludes"])
    assert env["py_modules"] == [str(ROOT / "platform" / "memel")], "the submitted memel code runs on the cluster"
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MY_FLAG": "1"}, "no secret travels"
    assert plan.env_names == ["MLFLOW_TRACKING_URI", "MY_FLAG"]
    assert plan.withheld_env == ("AWS_SECRET_ACCESS_KEY",)
    assert "pip" not in env
    assert (
        plan.entrypoint
        == "memel train jobs/smoke.yaml --set tracking.uri=http://mlflow.example:5000 --set stats.root=s3://bucket/prefix"
    )
    assert plan.metadata == {"memel_job": "smoke", "memel_command": "train", "memel_file": "jobs/smoke.yaml"}

    as_run = plan_job(SubmitRequest(SMOKE, "http://head:8265", "run", tuple(CLUSTER_OUTPUTS)), {})
    assert (
        as_run.entrypoint.startswith("memel run jobs/smoke.yaml --set ") and as_run.metadata["memel_command"] == "run"
    )

    bare = plan_job(SubmitRequest(SMOKE, "http://head:8265", "train", tuple(CLUSTER_OUTPUTS)), {})
    assert "env_vars" not in bare.runtime_env, "nothing is forwarded when nothing is set"
    with pytest.raises(SubmissionError, match="--env NOT_SET_ANYWHERE: not set"):
        plan_job(SubmitRequest(SMOKE, "http://head:8265", "train", tuple(CLUSTER_OUTPUTS), ("NOT_SET_ANYWHERE",)), {})


def test_pip_pins_memels_requirements_to_the_installed_versions() -> None:
    pinned = pinned_requirements()
    assert "torch==2.13.0" in pinned, "torch stays as declared (the local build may be 2.13.0+cpu)"
    assert f"numpy=={metadata.version('numpy')}" in pinned
    ray_pins = [line for line in pinned if line.startswith("ray[")]
    assert len(ray_pins) == 1 and ray_pins[0].endswith(f"]=={metadata.version('ray')}"), "extras kept, version pinned"
    assert not [line for line in pinned if line.startswith(("pytest", "seaweedfs"))], "test extras stay out"
    assert all("==" in line for line in pinned)
    plan = plan_job(SubmitRequest(SMOKE, "http://head:8265", "train", tuple(CLUSTER_OUTPUTS), pip=True), {})
    assert plan.runtime_env["pip"] == pinned


def test_project_root_is_found_from_the_job_file_or_the_current_folder(tmp_path: Path) -> None:
    assert find_project_root(SMOKE) == ROOT
    assert find_project_root(tmp_path / "elsewhere.yaml", cwd=ROOT / "tests") == ROOT
    with pytest.raises(SubmissionError, match="no project root"):
        find_project_root(tmp_path / "x.yaml", cwd=tmp_path)
    outside = tmp_path / "job.yaml"
    shutil.copy(SMOKE, outside)
    with pytest.raises(SubmissionError, match="outside the project root"):
        plan_job(SubmitRequest(outside, "http://head:8265", "train", tuple(CLUSTER_OUTPUTS)), {})


def test_submission_id_is_deterministic() -> None:
    content = SMOKE.read_bytes()
    first = submission_id("smoke", "run", content, ["train.steps=4"])
    assert first == submission_id("smoke", "run", content, ["train.steps=4"])
    assert re.fullmatch(r"memel-smoke-[0-9a-f]{10}", first)
    assert first != submission_id("smoke", "run", content, ["train.steps=5"]), "a changed override is a new job"
    assert first != submission_id("smoke", "train", content, ["train.steps=4"]), "another command is a new job"
    assert first != submission_id("smoke", "run", content + b"\n# edited", ["train.steps=4"]), (
        "an edited file is a new job"
    )
    a = plan_job(SubmitRequest(SMOKE, "http://a:8265", "train", tuple(CLUSTER_OUTPUTS)), {"AWS_REGION": "x"})
    b = plan_job(SubmitRequest(SMOKE, "http://b:8265", "train", tuple(CLUSTER_OUTPUTS)), {})
    assert a.submission_id == b.submission_id, "the id depends on what runs, not where or with which environment"


def test_entrypoint_quotes_every_argument() -> None:
    assert entrypoint("run", "jobs/a b.yaml", ["tracking.tags={x: 'y z'}"]) == (
        "memel run 'jobs/a b.yaml' --set 'tracking.tags={x: '\"'\"'y z'\"'\"'}'"
    )


def test_token_is_looked_up_where_ray_looks(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path_file = tmp_path / "path_token"
    path_file.write_text("from-path")
    explicit = tmp_path / "explicit"
    explicit.write_text("  from-flag \n")
    full = {"HOME": str(home), "RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path_file)}
    assert find_token(explicit, full) == ClusterToken("from-flag", f"--token-file {explicit}")
    assert find_token(None, full).value == "from-env"
    assert find_token(None, {**full, "RAY_AUTH_TOKEN": ""}).value == "from-path"
    assert find_token(None, {"HOME": str(home)}) == ClusterToken("from-home", str(home / ".ray" / "auth_token"))
    assert find_token(None, {"HOME": str(tmp_path)}) == ClusterToken(None, "none found")
    assert find_token(explicit, full).headers() == {"Authorization": "Bearer from-flag"}
    assert "from-flag" not in repr(find_token(explicit, full)), "the token never shows in a repr"
    with pytest.raises(SubmissionError, match="--token-file: cannot read"):
        find_token(tmp_path / "missing", full)
    with pytest.raises(SubmissionError, match="RAY_AUTH_TOKEN_PATH: cannot read"):
        find_token(None, {"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_address_comes_from_the_flag_or_rays_variables() -> None:
    env = {"RAY_ADDRESS": "http://ray-address:8265", "RAY_API_SERVER_ADDRESS": "http://api:8265/"}
    assert resolve_address("http://flag:8265", env) == "http://flag:8265"
    assert resolve_address(None, env) == "http://api:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "http://ray-address:8265"}) == "http://ray-address:8265"
    with pytest.raises(SubmissionError, match="no cluster address"):
        resolve_address(None, {})


def _no_cluster(*args, **kwargs):
    raise AssertionError("the cluster must not be contacted")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--set", "train.zero_stage=5", *(f"--set={o}" for o in CLUSTER_OUTPUTS)],
            r"train\.zero_stage: .*0, 1, 2 or 3",
        ),
        (
            ["--set", "train.global_batch_size=6", *(f"--set={o}" for o in CLUSTER_OUTPUTS)],
            "does not divide across workers",
        ),
        (["--set", "stats.root=s3://b/p"], r"tracking\.uri: .*local to this machine"),
        (["--set", "nope=1"], "unknown field"),
        (["--command", "run", "--set", "sweep.seeds=oops", *(f"--set={o}" for o in CLUSTER_OUTPUTS)], r"sweep\.seeds"),
        (["--command", "tune", *(f"--set={o}" for o in CLUSTER_OUTPUTS)], "tune: the job has no tune section"),
    ],
)
def test_bad_spec_is_refused_before_any_network_call(monkeypatch, args: list[str], message: str) -> None:
    monkeypatch.setattr("memel.submission.client.Cluster", _no_cluster)
    command = [] if "--command" in args else ["--command", "train"]
    result = RUNNER.invoke(app, ["submit", str(SMOKE), *command, "--address", "http://127.0.0.1:9", *args])
    assert result.exit_code == 2, result.output
    assert re.search(message, _flat(result.output)), result.output


def test_submit_without_an_address_says_how_to_give_one(monkeypatch) -> None:
    monkeypatch.setattr("memel.submission.client.Cluster", _no_cluster)
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    result = RUNNER.invoke(app, ["submit", str(SMOKE), "--command", "train"])
    assert result.exit_code == 2 and "no cluster address: pass --address" in _flat(result.output), result.output
    assert RUNNER.invoke(app, ["status"]).exit_code == 2


class _FakeJob:
    def __init__(self, status: str) -> None:
        self.status, self.message = status, "fake"


class _FakeCluster:
    """Records what would be sent; knows one job after the first submission."""

    submitted: ClassVar[list] = []

    def __init__(self, address: str, token: ClusterToken) -> None:
        self.address, self.token = address, token

    def submit(self, plan):
        first = plan.submission_id not in [p.submission_id for p in self.submitted]
        if first:
            self.submitted.append(plan)
        return _FakeJob("PENDING" if first else "RUNNING"), first


def test_submit_sends_the_plan_and_never_prints_secret_values(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr("memel.submission.client.Cluster", _FakeCluster)
    _FakeCluster.submitted = []
    token_file = tmp_path / "token"
    token_file.write_text("tok-" + "9" * 40)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-123")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "another-secret-456")
    monkeypatch.setenv("EXTRA_SETTING", "extra-value-789")
    args = [
        "submit",
        str(SMOKE),
        "--command",
        "train",
        "--address",
        "http://127.0.0.1:9",
        "--token-file",
        str(token_file),
    ]
    args += ["--env", "EXTRA_SETTING", *(f"--set={o}" for o in CLUSTER_OUTPUTS)]
    first = RUNNER.invoke(app, args)
    assert first.exit_code == 0, first.output
    (plan,) = _FakeCluster.submitted
    assert plan.runtime_env["env_vars"] == {"EXTRA_SETTING": "extra-value-789"}, "secrets never travel in runtime_env"
    assert plan.entrypoint.startswith("memel train jobs/smoke.yaml --set tracking.uri=")
    out = _flat(first.output)
    assert f"submitted {plan.submission_id}" in out
    assert "not sent: MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY" in out and "EXTRA_SETTING" in out
    assert f"--token-file {token_file}" in out
    for secret in ("very-secret-value-123", "another-secret-456", "extra-value-789", "tok-999"):
        assert secret not in first.output
    again = RUNNER.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert f"already on the cluster: {plan.submission_id} RUNNING" in _flat(again.output)
    assert len(_FakeCluster.submitted) == 1


def test_a_uri_travels_without_its_credentials_and_a_secret_is_never_forwarded() -> None:
    environ = {"MLFLOW_TRACKING_URI": "http://alice:pw-123@mlflow:5000", "AWS_SESSION_TOKEN": "tok-456", "MY": "1"}
    plan = plan_job(SubmitRequest(SMOKE, "http://head:8265", "train", tuple(CLUSTER_OUTPUTS), ("MY",)), environ)
    assert plan.runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "MY": "1"}
    assert plan.withheld_env == ("MLFLOW_TRACKING_URI credentials", "AWS_SESSION_TOKEN")
    with pytest.raises(SubmissionError, match=r"--env AWS_SESSION_TOKEN: a secret"):
        plan_job(
            SubmitRequest(SMOKE, "http://head:8265", "train", tuple(CLUSTER_OUTPUTS), ("AWS_SESSION_TOKEN",)), environ
        )


def test_credentials_in_an_override_or_the_job_file_are_refused(tmp_path: Path) -> None:
    with_password = [o for o in CLUSTER_OUTPUTS if not o.startswith("tracking.uri=")]
    with_password.append("tracking.uri=http://alice:pw-123@mlflow.example:5000")
    with pytest.raises(SubmissionError, match=r"--set tracking.uri: holds credentials") as raised:
        plan_job(SubmitRequest(SMOKE, "http://head:8265", "train", tuple(with_password)), {})
    assert "pw-123" not in str(raised.value)
    job = ROOT / "jobs" / f"test-credentials-{uuid.uuid4().hex[:8]}.yaml"
    text = SMOKE.read_text() + "\n# tracking at http://alice:pw-123@mlflow.example:5000\n"
    job.write_text(text)
    try:
        with pytest.raises(SubmissionError, match=r"holds credentials") as raised:
            plan_job(SubmitRequest(job, "http://head:8265", "train", tuple(CLUSTER_OUTPUTS)), {})
        assert "pw-123" not in str(raised.value)
    finally:
        job.unlink()


def test_cluster_errors_never_echo_the_token_or_forwarded_values() -> None:
    from memel.submission import ClusterError
    from memel.submission.client import Cluster

    cluster = Cluster.__new__(Cluster)  # no connection: only the error translation
    cluster.address, cluster.token = "http://head:8265", ClusterToken("tok-abcdef", "$RAY_AUTH_TOKEN")
    cluster._secrets = {"tok-abcdef", "s3cr3t-value"}
    with pytest.raises(ClusterError) as raised, cluster.errors():
        raise RuntimeError("Request failed with status code 500: bad env_vars {'K': 's3cr3t-value'} tok-abcdef")
    assert "s3cr3t-value" not in str(raised.value) and "tok-abcdef" not in str(raised.value)
    assert "status code 500" in str(raised.value)


@pytest.mark.parametrize("command", ["submit", "status", "logs", "stop"])
def test_every_submission_command_has_help_with_an_example(command: str) -> None:
    result = RUNNER.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and "--address" in result.output and "--token-file" in result.output


# ----------------------------------------------------------------------------------------------
# A real cluster: `ray start --head` with token authentication, on 127.0.0.1
# ----------------------------------------------------------------------------------------------

HEAD_START_TIMEOUT_S = 120.0
CLEAN_PREFIXES = (
    "RAY_",
    "MLFLOW_",
    "AWS_ENDPOINT",
    "AWS_ACCESS",
    "AWS_SECRET",
    "AWS_SESSION",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


@dataclass(frozen=True)
class Head:
    """A running head node: its dashboard address, the token and a file holding it."""

    address: str
    token: str
    token_file: Path
    home: Path  # an empty HOME for CLI runs, so no ~/.ray/auth_token of this machine is found
    secret: str  # the S3 secret key, which the head holds in its own environment (memel submit never sends it)

    def sdk(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})


def _clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(CLEAN_PREFIXES)}
    return {**env, **extra}


def _wait_for_dashboard(address: str, token: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    dashboard_logs = "".join(p.read_text()[-1500:] for p in log.parent.glob("ray/session_latest/logs/dashboard.log"))
    hint = (
        " (the dashboard runs without its HTTP server: the Job Submission API needs ray[default])"
        if "http server disabled" in dashboard_logs
        else ""
    )
    pytest.fail(f"the Ray dashboard at {address} did not answer in {HEAD_START_TIMEOUT_S:.0f}s{hint}")


def _kill_leftovers(token: str) -> None:
    """SIGKILL, by pid, any process of this head still alive: every one of them (job drivers in
    their own sessions too) inherited our unique RAY_AUTH_TOKEN."""
    marker = f"RAY_AUTH_TOKEN={token}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_head(s3_server) -> Iterator[Head]:
    """``ray start --head --block`` in its own process group, temp dir and free ports, with
    ``RAY_AUTH_MODE=token`` and its own ``RAY_AUTH_TOKEN`` (this machine's ~/.ray/auth_token is
    neither read nor written), and the S3 keys in its own environment, as a cluster holds its secrets. Stopped by signalling that process group only, never ``ray stop``."""
    workdir = Path(tempfile.mkdtemp(prefix="mr-", dir="/tmp"))  # short: Ray's socket paths live under it
    token = secrets.token_hex(32)
    token_file = workdir / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    home = workdir / "home"
    home.mkdir()
    gcs, dashboard, node_manager, object_manager, agent_grpc, agent_http, metrics, runtime_env = free_ports(
        "127.0.0.1", 8
    )
    command = [
        "ray",
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--node-manager-port",
        str(node_manager),
        "--object-manager-port",
        str(object_manager),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--dashboard-agent-listen-port",
        str(agent_http),
        "--metrics-export-port",
        str(metrics),
        "--runtime-env-agent-port",
        str(runtime_env),
        "--num-cpus",
        "2",
        "--temp-dir",
        str(workdir / "ray"),
        "--disable-usage-stats",
    ]
    keys = {name: value for name, value in s3_server.env().items() if name.startswith("AWS_") and "KEY" in name}
    env = _clean_env(
        **keys,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # a test head has nothing to drain: stop at once
    )
    log_path = workdir / "head.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_dashboard(address, token, process, log_path)
        yield Head(address, token, token_file, home, s3_server.secret_key)
    finally:
        if process.poll() is None:  # `ray start --block` stops its processes on SIGTERM
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        _kill_leftovers(token)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _holds(path: Path, text: str) -> bool:
    """Whether the file at ``path`` contains ``text`` (unreadable files hold nothing)."""
    try:
        return text.encode() in path.read_bytes()
    except OSError:
        return False


def _memel(head: Head, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process, with a clean environment and an empty HOME."""
    return subprocess.run(
        [sys.executable, "-c", "from memel.cli import app; app(prog_name='memel')", *args],
        env=_clean_env(HOME=str(head.home), COLUMNS="200", **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _submit_args(head: Head, mlflow_server: str, run_tag: str) -> list[str]:
    overrides = [
        *SMALL,
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=submission",
        f"stats.root=s3://memel-submit/{run_tag}",
    ]
    return [
        "submit",
        str(SMOKE),
        "--address",
        head.address,
        *(f"--set={o}" for o in overrides),
    ]  # the default: memel run


@pytest.fixture(scope="module")
def smoke_job(
    ray_head: Head, mlflow_server: str, s3_server
) -> tuple[subprocess.CompletedProcess, str, list[str], dict[str, str]]:
    """jobs/smoke.yaml (4 steps, 1 worker) submitted with --wait through the real CLI."""
    args = _submit_args(ray_head, mlflow_server, uuid.uuid4().hex[:8])
    env = dict(s3_server.env())
    result = _memel(ray_head, *args, "--token-file", str(ray_head.token_file), "--wait", timeout=840, **env)
    found = re.search(r"memel-smoke-[0-9a-f]{10}", result.stdout)
    assert found, result.stdout + result.stderr
    return result, found.group(0), args, env


def test_cluster_refuses_a_missing_or_wrong_token_with_a_clear_error(ray_head: Head, tmp_path: Path) -> None:
    missing = _memel(ray_head, "status", "--address", ray_head.address)
    assert missing.returncode == 2, missing.stdout + missing.stderr
    text = _flat(missing.stdout)
    assert "requires a token and none was found (HTTP 401)" in text
    assert (
        "--token-file PATH, then $RAY_AUTH_TOKEN, then the file named by $RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token"
        in text
    )
    assert "ray get-auth-token" in text

    wrong = tmp_path / "wrong"
    wrong.write_text("0" * 64)
    refused = _memel(
        ray_head,
        "submit",
        str(SMOKE),
        "--command",
        "train",
        "--address",
        ray_head.address,
        "--token-file",
        str(wrong),
        *(f"--set={o}" for o in CLUSTER_OUTPUTS),
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"rejected the token from --token-file {wrong} (HTTP 403)" in _flat(refused.stdout)
    assert "0" * 64 not in refused.stdout + refused.stderr and ray_head.token not in refused.stdout + refused.stderr
    assert not [job for job in ray_head.sdk().list_jobs() if job.entrypoint.endswith("stats.root=s3://bucket/prefix")]


@pytest.mark.timeout(900)
def test_submit_wait_runs_the_smoke_job_to_success(smoke_job, ray_head: Head) -> None:
    result, job_id, _, _ = smoke_job
    out = result.stdout
    assert result.returncode == 0, out[-5000:] + result.stderr[-3000:]
    assert f"submitted {job_id}" in _flat(out)
    assert re.search(r"\[memel\] step 4/4 loss", out), "the job's log is streamed while waiting"
    assert f"{job_id} SUCCEEDED" in _flat(out)
    assert ray_head.token not in out + result.stderr
    job = ray_head.sdk().get_job_info(job_id)
    assert str(job.status) == "SUCCEEDED"
    assert job.entrypoint.startswith("memel run jobs/smoke.yaml --set train.steps=4")
    assert job.metadata["memel_job"] == "smoke"
    assert "AWS_ENDPOINT_URL" in job.runtime_env["env_vars"]
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(job.runtime_env["env_vars"]), "the head has them"
    assert "not sent: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in _flat(out)
    # runtime_resources/ is the unpacked project, whose tests/s3_server.py holds the test key as a constant
    files = [p for p in (ray_head.home.parent / "ray").rglob("*") if p.is_file() and "runtime_resources" not in p.parts]
    assert any(p.name == "runtime_env_agent.log" for p in files), "the scan reaches Ray's logs"
    leaked = [p for p in files if _holds(p, ray_head.secret)]
    assert not leaked, f"the S3 secret key is in the head's Ray files: {leaked[:5]}"


@pytest.mark.timeout(900)
def test_resubmitting_returns_the_same_id_without_a_duplicate(smoke_job, ray_head: Head) -> None:
    _, job_id, args, env = smoke_job
    before = [job.submission_id for job in ray_head.sdk().list_jobs()]
    # the token from RAY_AUTH_TOKEN_PATH this time: one of the places Ray itself looks
    again = _memel(ray_head, *args, "--wait", RAY_AUTH_TOKEN_PATH=str(ray_head.token_file), **env)
    assert again.returncode == 0, again.stdout + again.stderr
    text = _flat(again.stdout)
    assert f"already on the cluster: {job_id} SUCCEEDED" in text
    assert f"{job_id} SUCCEEDED" in text
    after = [job.submission_id for job in ray_head.sdk().list_jobs()]
    assert sorted(after) == sorted(before) and after.count(job_id) == 1


@pytest.mark.timeout(900)
def test_status_logs_and_stop(smoke_job, ray_head: Head) -> None:
    _, job_id, _, _ = smoke_job
    table = _memel(ray_head, "status", "--address", ray_head.address, RAY_AUTH_TOKEN=ray_head.token)
    assert table.returncode == 0, table.stdout + table.stderr
    row = next(line for line in table.stdout.splitlines() if job_id in line)
    assert "SUCCEEDED" in row and "run" in row

    one = _memel(ray_head, "status", job_id, "--address", ray_head.address, "--token-file", str(ray_head.token_file))
    assert one.returncode == 0 and "SUCCEEDED" in one.stdout and "memel run jobs/smoke.yaml" in one.stdout, one.stdout

    logs = _memel(ray_head, "logs", job_id, "--address", ray_head.address, "--token-file", str(ray_head.token_file))
    assert logs.returncode == 0, logs.stdout + logs.stderr
    assert re.search(r"\[memel\] step 2/4 loss", logs.stdout) and re.search(r"\[memel\] step 4/4 loss", logs.stdout)
    followed = _memel(
        ray_head, "logs", job_id, "--follow", "--address", ray_head.address, "--token-file", str(ray_head.token_file)
    )
    assert (
        followed.returncode == 0
        and "[memel] step 4/4" in followed.stdout
        and f"{job_id} SUCCEEDED" in _flat(followed.stdout)
    )

    sleeper = "memel-sleeper-0000000000"
    ray_head.sdk().submit_job(entrypoint="sleep 300", submission_id=sleeper)
    deadline = time.monotonic() + 120
    while str(ray_head.sdk().get_job_status(sleeper)) != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    stop = _memel(ray_head, "stop", sleeper, "--address", ray_head.address, "--token-file", str(ray_head.token_file))
    assert stop.returncode == 0 and f"stopping {sleeper}" in _flat(stop.stdout), stop.stdout + stop.stderr
    while str(ray_head.sdk().get_job_status(sleeper)) != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert str(ray_head.sdk().get_job_status(sleeper)) == "STOPPED"

    ended = _memel(ray_head, "stop", job_id, "--address", ray_head.address, "--token-file", str(ray_head.token_file))
    assert ended.returncode == 0 and f"{job_id} had already ended: SUCCEEDED" in _flat(ended.stdout), ended.stdout
    unknown = _memel(
        ray_head,
        "status",
        "memel-nope-0000000000",
        "--address",
        ray_head.address,
        "--token-file",
        str(ray_head.token_file),
    )
    assert unknown.returncode == 1 and "no job 'memel-nope-0000000000'" in _flat(unknown.stdout), unknown.stdout
