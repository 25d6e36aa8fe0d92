"""Following a job: stream its logs while it runs, then its final status."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import ClusterAuthError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails

    from .client import Cluster

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


def write_stdout(text: str) -> None:
    """Write log text as is (no markup), flushed."""
    sys.stdout.write(text)
    sys.stdout.flush()


def status_of(job: JobDetails) -> str:
    return str(getattr(job.status, "value", job.status))


def exit_code(job: JobDetails) -> int:
    """0 for SUCCEEDED, 1 for FAILED or STOPPED (or anything else)."""
    return 0 if status_of(job) == "SUCCEEDED" else 1


def wait_for_end(cluster: Cluster, submission_id: str, poll_s: float = 1.0) -> JobDetails:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED."""
    while True:
        job = cluster.job(submission_id)
        if status_of(job) in TERMINAL:
            return job
        time.sleep(poll_s)


async def _tail(cluster: Cluster, submission_id: str, write: Callable[[str], None], written: list[int]) -> None:
    async for chunk in cluster.sdk.tail_job_logs(submission_id):
        write(chunk)
        written[0] += len(chunk)


def _poll_logs(cluster: Cluster, submission_id: str, write: Callable[[str], None], written: int, poll_s: float) -> None:
    while True:
        done = status_of(cluster.job(submission_id)) in TERMINAL
        logs = cluster.logs(submission_id)
        if len(logs) > written:
            write(logs[written:])
            written = len(logs)
        if done:
            return
        time.sleep(poll_s)


def follow_job(
    cluster: Cluster, submission_id: str, write: Callable[[str], None] = write_stdout, poll_s: float = 1.0
) -> JobDetails:
    """Stream the job's logs to ``write`` until it ends (Ray's log websocket, or polling where the
    websocket is not available), then return its final details."""
    written = [0]  # characters written so far, so that polling continues where the stream stopped
    try:
        with cluster.errors(submission_id):
            asyncio.run(_tail(cluster, submission_id, write, written))
    except ClusterAuthError:
        raise
    except Exception as error:  # noqa: BLE001 - a websocket a proxy refused, a dropped connection: poll instead
        status = getattr(error, "status", None)
        if status in (401, 403):
            from .client import auth_error

            raise auth_error(cluster.address, cluster.token, "Authentication failed" if status == 403 else "") from None
        _poll_logs(cluster, submission_id, write, written[0], poll_s)
    return wait_for_end(cluster, submission_id, poll_s)
