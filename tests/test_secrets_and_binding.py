"""Secrets reach the workers and nothing else; the embedded Ray listens on 127.0.0.1 only.

The secrets test runs a real 2-worker smoke run (`memel run`, a real MLflow server whose URI
carries a password, sentinel AWS and MLflow secrets in the environment, Ray's temp folder
private to the run) and then searches every place a secret could land: the output folder,
the MLflow run (params, tags, metrics, every artifact), the command's stdout/stderr and the
whole Ray session folder (logs, runtime-env records, ...). It uses only the CLI and MLflow's
own client, so it runs against any version of memel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "jobs" / "smoke.yaml"
SENTINELS = {
    "AWS_ACCESS_KEY_ID": "AKIAsentinelKEY4711",
    "AWS_SECRET_ACCESS_KEY": "sentinelSECRETaws4711",
    "MLFLOW_TRACKING_PASSWORD": "sentinelMLFLOWpw4711",
    "MLFLOW_TRACKING_TOKEN": "sentinelMLFLOWtoken4711",
}
URI_PASSWORD = "sentinelURIpw4711"


def _files_holding(folder: Path, needles: list[str]) -> dict[str, list[str]]:
    """{needle: [files under ``folder`` whose bytes contain it]}, for the needles found."""
    found: dict[str, list[str]] = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            for needle in needles:
                if needle.encode() in data:
                    found.setdefault(needle, []).append(str(path.relative_to(folder)))
    return found


def _mlflow_texts(tracking_uri: str, run_id: str, download_to: Path) -> str:
    """Everything MLflow holds for the run: params, tags, metric keys and every artifact's bytes."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    parts = [repr(run.data.params), repr(run.data.tags), repr(sorted(run.data.metrics)), run.info.artifact_uri]
    local = Path(
        download_artifacts(run_id=run_id, artifact_path="", dst_path=str(download_to), tracking_uri=tracking_uri)
    )
    parts += [p.read_bytes().decode(errors="replace") for p in local.rglob("*") if p.is_file()]
    experiment = client.get_experiment(run.info.experiment_id)
    parts.append(repr(experiment.tags) + experiment.artifact_location)
    return "\n".join(parts)


def test_secrets_reach_no_log_param_artifact_or_output(tmp_path: Path, mlflow_server: str) -> None:
    host = mlflow_server.removeprefix("http://")
    uri = f"http://memel:{URI_PASSWORD}@{host}"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, **SENTINELS, "RAY_TMPDIR": str(ray_tmp), "TMPDIR": str(private_tmp), "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "from memel.cli import app; app(prog_name='memel')",
                "run",
                str(SMOKE),
                "--set",
                f"output_dir={out}",
                "--set",
                "train.steps=4",
                "--set",
                "train.log_every=2",
                "--set",
                "eval.every=4",
                "--set",
                "eval.batches=1",
                "--set",
                "stats.every=2",
                "--set",
                "checkpoint.every=4",
                "--set",
                "inhibition.late_start=1",
                "--set",
                "inhibition.forget_steps=1",
                "--set",
                f"tracking.uri={uri}",
                "--set",
                "tracking.experiment=secrets",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        needles = [*SENTINELS.values(), URI_PASSWORD]

        import json

        run = json.loads((out / "run.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
        assert summary["metrics"]["step"] == 4, "the run must have trained"
        from mlflow import MlflowClient

        client = MlflowClient(mlflow_server)
        assert client.get_run(run["run_id"]).info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run["run_id"], "train/loss")] == [2, 4], (
            "rank 0 must have reached MLflow with the credentials it was handed"
        )
        sessions = list((ray_tmp / "ray").glob("session_2*"))
        assert sessions, f"no Ray session folder under {ray_tmp}"
        assert any(sessions[0].rglob("runtime_env_agent.log")), "Ray's runtime-env log must be among what is searched"
        leaks = {
            "output folder": _files_holding(out, needles),
            "Ray session folder": _files_holding(ray_tmp, needles),
            "private temp folder": _files_holding(private_tmp, needles),
        }
        mlflow_text = _mlflow_texts(mlflow_server, run["run_id"], tmp_path / "artifacts")
        leaks["MLflow run"] = {n: ["params/tags/artifacts"] for n in needles if n in mlflow_text}
        leaks["stdout/stderr"] = {n: ["output"] for n in needles if n in done.stdout + done.stderr}
        assert not any(leaks.values()), f"secrets found: {leaks}"
        assert client.get_run(run["run_id"]).data.params["tracking.uri"] == f"http://memel:***@{host}"
        assert not list(private_tmp.glob("memel-secrets-*")), "the workers' secrets file must be deleted after the run"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _listening(process) -> list[tuple[str, int]]:
    import psutil

    try:
        return [
            (c.laddr.ip, c.laddr.port) for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
        ]
    except psutil.Error:
        return []


def check_private_token(home: Path) -> None:
    """The embedded Ray runs with token authentication on, its token in ``home``/.ray/auth_token
    readable by this user only, and its dashboard refuses a request without that token."""
    import json
    import urllib.error
    import urllib.request

    import ray

    token_file = home / ".ray" / "auth_token"
    assert (token_file.stat().st_mode & 0o777) == 0o600, oct(token_file.stat().st_mode)
    assert (token_file.parent.stat().st_mode & 0o077) == 0, oct(token_file.parent.stat().st_mode)
    token = token_file.read_text().strip()
    assert len(token) == 64, "256 bits, as Ray generates"
    dashboard = ray.get_runtime_context().worker.node.address_info["webui_url"]
    url = f"http://{dashboard}/api/version"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})) as answer:
        assert "ray_version" in json.loads(answer.read())
    try:
        urllib.request.urlopen(url, timeout=10)
    except urllib.error.HTTPError as refused:
        assert refused.code in (401, 403), refused.code
    else:
        raise AssertionError("the dashboard answered without the token")
    print("token private")


def test_embedded_ray_listens_on_loopback_only_and_keeps_its_token_private(tmp_path: Path) -> None:
    """Run in a fresh interpreter with an empty HOME and no token settings: the embedded Ray of this
    process (if an earlier test started one) must neither hide nor join the check, and Ray would
    otherwise write the token it generates readable by every user (mode 0644)."""
    home = tmp_path / "home"
    home.mkdir()
    here = str(Path(__file__).parent)
    check = (
        f"import sys; sys.path.insert(0, {here!r}); import {Path(__file__).stem} as t; "
        f"from pathlib import Path; t.check_loopback(after=lambda: t.check_private_token(Path({str(home)!r})))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    result = subprocess.run(
        [sys.executable, "-c", check],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**env, "HOME": str(home)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "loopback only" in result.stdout and "token private" in result.stdout


def check_loopback(after: Callable[[], None] | None = None) -> None:
    """Start the embedded Ray, then assert every listening socket of this process tree is on loopback
    (and run ``after`` while Ray is up)."""
    import psutil
    import ray

    from memel.training import init_ray

    init_ray(None, workers=1)
    try:

        @ray.remote
        def pid() -> int:
            return os.getpid()

        worker_pid = ray.get(pid.remote())  # a worker process exists and has its gRPC server up
        processes = [psutil.Process(), *psutil.Process().children(recursive=True)]
        assert worker_pid in {p.pid for p in processes}
        sockets = {(p.pid, p.name()): _listening(p) for p in processes}
        names = " ".join(name for (_, name), found in sockets.items() if found)
        for component in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent"):
            assert component in names, f"{component} not found among the listening processes: {names}"
        exposed = {
            key: [f"{ip}:{port}" for ip, port in found if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
            for key, found in sockets.items()
        }
        assert not any(exposed.values()), f"listening beyond loopback: { {k: v for k, v in exposed.items() if v} }"
        print(f"loopback only: {sum(len(found) for found in sockets.values())} listening sockets checked")
        if after is not None:
            after()
    finally:
        ray.shutdown()
