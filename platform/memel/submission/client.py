"""The Job Submission client, with the cluster token attached and errors worded for memel users."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from memel.errors import shown
from memel.redaction import redact

from .auth import HOW_TO_PROVIDE, LOOKUP_ORDER, ClusterToken
from .errors import ClusterAuthError, ClusterError, JobNotFound, SubmissionError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

    from .job import JobPlan

#: Where the dashboard address comes from without --address (the variables Ray's own clients read).
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def resolve_address(address: str | None, environ: Mapping[str, str] | None = None) -> str:
    """``--address``, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS; an error without any."""
    env = os.environ if environ is None else environ
    for source, candidate in (("--address", address), *((name, env.get(name)) for name in ADDRESS_ENV)):
        if candidate and candidate.strip():
            return check_address(candidate.strip().rstrip("/"), source)
    raise SubmissionError(
        "no cluster address: pass --address http://HEAD:8265 (the Ray dashboard of the head node) "
        "or set RAY_ADDRESS / RAY_API_SERVER_ADDRESS"
    )


def check_address(address: str, source: str = "--address") -> str:
    """``address`` when it reads as a cluster address (``http(s)://HOST:PORT``, ``ray://HOST:PORT``
    or ``HOST:PORT``); a SubmissionError naming ``source`` otherwise."""
    from urllib.parse import urlsplit

    if address == "auto":  # the running cluster on this node
        return address
    parts = urlsplit(address if "://" in address else f"http://{address}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (
        parts.scheme not in ("http", "https", "ray")
        or not parts.hostname
        or port == -1
        or (port is None and "://" not in address)
    ):
        raise SubmissionError(
            f"{source}: {shown(redact(address))} is not a cluster address; give the Ray dashboard of the head node, "
            "e.g. http://HEAD:8265"
        )
    return address


def auth_error(address: str, token: ClusterToken, ray_message: str) -> ClusterAuthError:
    """The 401/403 message: what was sent, where tokens are looked up, how to provide one."""
    if ray_message.startswith("Authentication failed") or token.value:
        what = f"rejected the token from {token.source} (HTTP 403): it is not this cluster's token"
    else:
        what = "requires a token and none was found (HTTP 401)"
    return ClusterAuthError(
        f"the Ray cluster at {address} {what}. memel looks for the token in: {LOOKUP_ORDER}. To fix it, {HOW_TO_PROVIDE}."
    )


#: Ray loggers whose INFO lines (each file left out, each package uploaded) would drown memel's output.
_CHATTY_LOGGERS = (
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
    "ray._private.runtime_env.packaging",
    "ray._private.runtime_env.working_dir",
)


class _DropDefaultExcludeNotice(logging.Filter):
    """Ray warns that it now leaves .git out by default; memel leaves it out anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is now ignored by default" not in str(record.msg)


def _quiet_ray_logging() -> None:
    for name in _CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if not any(isinstance(f, _DropDefaultExcludeNotice) for f in logger.filters):
            logger.addFilter(_DropDefaultExcludeNotice())


@contextlib.contextmanager
def _no_address_env() -> Iterator[None]:
    """Ray's client lets RAY_ADDRESS override an explicit address; memel's --address wins instead."""
    saved = {name: os.environ.pop(name) for name in ADDRESS_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class Cluster:
    """One Ray cluster's Job Submission API (``http://HEAD:8265``), authenticated with ``token``."""

    def __init__(self, address: str, token: ClusterToken) -> None:
        self.address = redact(address)  # as shown in messages; the client gets the address as given
        self.token = token
        self._secrets = {token.value} if token.value else set()  # never echoed in an error message
        with self._errors(), _no_address_env():
            from ray.job_submission import JobSubmissionClient

            _quiet_ray_logging()  # after the import: Ray's job SDK sets its own level on import

            self.sdk: JobSubmissionClient = JobSubmissionClient(address, headers=token.headers())

    @contextlib.contextmanager
    def _errors(self, submission_id: str | None = None) -> Iterator[None]:
        """Translate Ray's exceptions into ClusterError / ClusterAuthError / JobNotFound."""
        from ray.exceptions import AuthenticationError
        from requests.exceptions import RequestException

        try:
            yield
        except AuthenticationError as error:
            raise auth_error(self.address, self.token, error.message) from None
        except (ConnectionError, RequestException) as error:
            raise ClusterError(
                f"cannot reach the Ray dashboard at {self.address} ({type(error).__name__}); is the cluster up and "
                "is this its dashboard address (http://HEAD:8265)?"
            ) from None
        except RuntimeError as error:
            text = self._redact(str(error))
            if submission_id and "status code 404" in text:
                raise JobNotFound(f"no job {submission_id!r} on the cluster at {self.address}") from None
            raise ClusterError(f"the cluster at {self.address} refused the request: {text}") from None

    def _redact(self, text: str) -> str:
        """``text`` without the token, the forwarded values and any URI credentials."""
        return redact(text, self._secrets)

    def job(self, submission_id: str) -> JobDetails:
        """The job's details; raises JobNotFound."""
        with self._errors(submission_id):
            return self.sdk.get_job_info(submission_id)

    def find(self, submission_id: str) -> JobDetails | None:
        """The job's details, or None when there is no such job."""
        try:
            return self.job(submission_id)
        except JobNotFound:
            return None

    def submit(self, plan: JobPlan) -> tuple[JobDetails, bool]:
        """Submit ``plan`` unless its id exists; returns (the job, whether it was submitted now)."""
        existing = self.find(plan.submission_id)
        if existing is not None:
            return existing, False
        self._secrets.update(plan.runtime_env.get("env_vars", {}).values())
        try:
            with self._errors():
                self.sdk.submit_job(
                    entrypoint=plan.entrypoint,
                    submission_id=plan.submission_id,
                    runtime_env=plan.runtime_env,
                    metadata=plan.metadata,
                )
        except ValueError as error:  # the runtime_env itself (e.g. the upload is too large)
            raise SubmissionError(f"runtime_env: {self._redact(str(error))}") from None
        except ClusterError as error:
            existing = self.find(plan.submission_id)  # submitted meanwhile by someone else
            if existing is None or isinstance(error, ClusterAuthError):
                raise
            return existing, False
        return self.job(plan.submission_id), True

    def jobs(self) -> list[JobDetails]:
        """Every job the cluster knows, oldest first."""
        with self._errors():
            jobs = self.sdk.list_jobs()
        return sorted(jobs, key=lambda job: job.start_time or 0)

    def logs(self, submission_id: str) -> str:
        """The job's whole log so far."""
        with self._errors(submission_id):
            return self.sdk.get_job_logs(submission_id)

    def stop(self, submission_id: str) -> bool:
        """Ask the cluster to stop the job; False when it had already ended."""
        with self._errors(submission_id):
            return self.sdk.stop_job(submission_id)

    def errors(self, submission_id: str | None = None) -> Any:
        """The error translation as a context manager (for calls made on ``sdk`` directly)."""
        return self._errors(submission_id)
