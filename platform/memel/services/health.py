"""Is a started server answering yet: MLflow ``/health``, the S3 API, the dashboard's HTTP."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from memel.services.config import REGION
from memel.services.credentials import S3Credentials

PROBE_KEY = ".memel-services-probe"


class ServiceError(RuntimeError):
    """A server did not come up; ``log_tail`` holds the end of its log."""

    def __init__(self, service: str, reason: str, log: Path, log_tail: str) -> None:
        super().__init__(f"{service}: {reason} (log: {log})")
        self.service, self.reason, self.log, self.log_tail = service, reason, log, log_tail


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of ``path`` (empty when unreadable)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - 64_000))
            return "\n".join(handle.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def http_ok(url: str, timeout_s: float = 3.0) -> None:
    """Raise unless ``GET url`` answers 2xx (after redirects)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        if not 200 <= response.status < 300:
            raise urllib.error.URLError(f"HTTP {response.status}")


def s3_client(endpoint: str, credentials: S3Credentials):  # -> a boto3 S3 client
    """A path-style boto3 S3 client for ``endpoint``."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=credentials.access_key,
        aws_secret_access_key=credentials.secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=3, read_timeout=10),
    )


def s3_ready(endpoint: str, credentials: S3Credentials, bucket: str) -> None:
    """Raise unless the store lists buckets, holds ``bucket`` (created if missing) and takes a write."""
    client = s3_client(endpoint, credentials)
    names = [entry["Name"] for entry in client.list_buckets().get("Buckets", [])]
    if bucket not in names:
        client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key=PROBE_KEY, Body=b"ok")
    client.delete_object(Bucket=bucket, Key=PROBE_KEY)


def wait_ready(
    service: str, check: Callable[[], None], process: subprocess.Popen | None, log: Path, timeout_s: float
) -> None:
    """Call ``check`` until it returns; raise :class:`ServiceError` with the log tail when the
    process exits or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while True:
        if process is not None and process.poll() is not None:
            raise ServiceError(service, f"exited with code {process.returncode} before answering", log, log_tail(log))
        try:
            check()
            return
        except Exception as error:  # noqa: BLE001 - any failure means "not ready yet"
            last = f"{type(error).__name__}: {error}"
        if time.monotonic() >= deadline:
            raise ServiceError(service, f"did not answer within {timeout_s:.0f} s ({last})", log, log_tail(log))
        time.sleep(0.3)
