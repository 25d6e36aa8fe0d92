"""A real MLflow tracking server on 127.0.0.1 for tests.

Session fixture ``mlflow_server`` yields the server's URL (``http://127.0.0.1:PORT``): a
``mlflow server`` process with a SQLite backend store and proxied artifacts in a temp
folder, polled on ``/health`` until it answers (about 12 s), terminated at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import stop_process_group

from memel.services.ports import free_ports

START_TIMEOUT_S = 120.0


@contextlib.contextmanager
def run_mlflow_server() -> Iterator[str]:
    """Start ``mlflow server`` on a free loopback port; stop it (SIGTERM, then SIGKILL) on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="memel-mlflow-"))
    port = free_ports("127.0.0.1", 1)[0]
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination",
        str(workdir / "artifacts"),
    ]
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - closed below
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {process.returncode}: {(workdir / 'server.log').read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer /health in {START_TIMEOUT_S:.0f}s")
            time.sleep(0.5)
        yield url
    finally:
        stop_process_group(process, grace_s=15)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[str]:
    """URL of a real MLflow server for the test session."""
    with run_mlflow_server() as url:
        yield url
