"""How the driver's settings and secrets reach the training workers, without Ray logging them.

Ray writes every ``runtime_env`` it sets up (``env_vars`` included) to its session logs, so
only settings that are not secret travel that way (S3 endpoint, region, fault injection, step timing).
Secrets (any forwarded variable whose name marks it as one, and the ``user:password`` of a
tracking URI, as ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``) go into a file that only this
user can read (mode 0600, in a private 0700 folder), which the driver deletes when the run
ends; ``runtime_env`` carries only the file's path. Each worker reads it before it starts.
On a cluster whose nodes cannot see the driver's file, the workers use their own node's
environment instead (set it with the cluster's secret mechanism, e.g. a Kubernetes Secret).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from memel.redaction import redact, split_userinfo
from memel.tracking import is_secret_key

from .callbacks.fault import FAULT_MARKER_ENV, FAULT_STEP_ENV
from .callbacks.timing import STEP_TIMES_ENV

log = logging.getLogger("memel.training")

#: Environment variables forwarded to the workers (values never logged).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    FAULT_STEP_ENV,
    FAULT_MARKER_ENV,
    STEP_TIMES_ENV,
)

#: The variable (in ``runtime_env``) naming the workers' secrets file.
SECRETS_FILE_ENV = "MEMEL_WORKER_SECRETS_FILE"


def is_secret(name: str, value: str) -> bool:
    """Whether a variable holds a secret: by its name, or a value with URI credentials in it."""
    return is_secret_key(name) or redact(value) != value


def split_env(
    environ: Mapping[str, str], tracking_uri: str | None
) -> tuple[dict[str, str], dict[str, str], str | None]:
    """(plain variables, secret variables, the tracking URI without credentials) for the workers."""
    plain: dict[str, str] = {}
    secret: dict[str, str] = {}
    for name in FORWARDED_ENV:
        if name in environ:
            (secret if is_secret(name, environ[name]) else plain)[name] = environ[name]
    if tracking_uri is None:
        return plain, secret, None
    bare, user, password = split_userinfo(tracking_uri)
    if user is not None or password is not None:
        plain.pop("MLFLOW_TRACKING_USERNAME", None)
        secret["MLFLOW_TRACKING_USERNAME"] = user or ""
        secret["MLFLOW_TRACKING_PASSWORD"] = password or ""
    return plain, secret, bare


def _write_private(folder: Path, secret: Mapping[str, str]) -> Path:
    path = folder / "env.json"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(dict(secret), handle)
    return path


@contextlib.contextmanager
def worker_env(
    tracking_uri: str | None, environ: Mapping[str, str] | None = None
) -> Iterator[tuple[dict[str, str], str | None]]:
    """(the workers' ``env_vars``, the tracking URI they use) for one run; the secrets file
    exists while the block runs and is deleted after it."""
    plain, secret, bare_uri = split_env(os.environ if environ is None else environ, tracking_uri)
    if not secret:
        yield plain, bare_uri
        return
    folder = Path(tempfile.mkdtemp(prefix="memel-secrets-"))  # mode 0700
    try:
        path = _write_private(folder, secret)
        yield {**plain, SECRETS_FILE_ENV: str(path)}, bare_uri
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def load_worker_env() -> None:
    """In a worker: put the driver's secrets into this process's environment (when this node can see them)."""
    path = os.environ.get(SECRETS_FILE_ENV)
    if not path:
        return
    try:
        secret = json.loads(Path(path).read_text())
    except FileNotFoundError:
        log.warning("memel: the driver's secrets file is not on this node; the workers use this node's own environment")
        return
    os.environ.update({str(name): str(value) for name, value in secret.items()})
