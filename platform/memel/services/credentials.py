"""S3 credentials for the local store, and the private files that hold them.

Keys come from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` when both are set, otherwise
they are generated once (``secrets``) and kept in the state directory with mode 0600. Their
``repr`` never shows the secret; nothing here prints or logs it.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from memel.atomic import write_text
from memel.services.config import REGION, StatePaths


@dataclass(frozen=True)
class S3Credentials:
    """An access key pair; ``source`` says where it came from (``environment`` or a file)."""

    access_key: str
    secret_key: str = field(repr=False)
    source: str = "generated"


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600 (never readable by others, even briefly)."""
    write_text(path, text, mode=0o600)


def load_or_create(paths: StatePaths) -> S3Credentials:
    """The environment's AWS keys when both are set, else the state dir's (generated on first use)."""
    access, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if access and secret:
        return S3Credentials(access, secret, "environment")
    if paths.credentials.is_file():
        stored = json.loads(paths.credentials.read_text())
        return S3Credentials(stored["access_key"], stored["secret_key"], str(paths.credentials))
    created = S3Credentials("memel" + secrets.token_hex(8), secrets.token_urlsafe(32), str(paths.credentials))
    write_private(paths.credentials, json.dumps({"access_key": created.access_key, "secret_key": created.secret_key}))
    return created


def s3_client_env(endpoint: str, credentials: S3Credentials) -> dict[str, str]:
    """The variables that point boto3, pyarrow and MLflow's artifact store at ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": credentials.access_key,
        "AWS_SECRET_ACCESS_KEY": credentials.secret_key,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
    }


def write_env_file(path: Path, variables: dict[str, str]) -> None:
    """An ``env.sh`` of ``export NAME=value`` lines (mode 0600: it may hold the secret key)."""
    lines = ["# Written by `memel services up`; use it with: source " + shlex.quote(str(path))]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in variables.items()]
    write_private(path, "\n".join(lines) + "\n")
