"""Where statistics go: resolving ``stats.root``, partition paths, bucket management, preflight.

``root`` is a local folder or ``s3://bucket/prefix``. S3 uses the filesystem that
:mod:`memel.data.filesystems` builds from the standard AWS environment variables
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``); boto3 is used only to check and create buckets.
Secrets never appear in messages: :func:`memel.redaction.redact` removes them from any error text.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pyarrow.fs as pafs

from memel.data.filesystems import s3_filesystem
from memel.errors import ConfigError
from memel.redaction import redact

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def s3_endpoint() -> str | None:
    """The configured S3 endpoint URL, if any (not a secret)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@dataclass(frozen=True)
class StatsRoot:
    """A resolved ``stats.root``: filesystem, base path in it, and the S3 bucket if any."""

    uri: str
    fs: pafs.FileSystem
    base: str
    bucket: str | None

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None


def resolve_root(root: str, field: str = "stats.root") -> StatsRoot:
    """Parse ``root``; raises ConfigError naming ``field`` for an unsupported form."""
    if not isinstance(root, str) or not root.strip():
        raise ConfigError(f"{field}: got {root!r}; allowed: a local folder or s3://bucket/prefix")
    if root.startswith("s3://"):
        base = root[len("s3://") :].strip("/")
        bucket = base.split("/", 1)[0]
        if not _BUCKET.match(bucket):
            raise ConfigError(f"{field}: got {root!r}; {bucket!r} is not a valid S3 bucket name (3-63 of a-z 0-9 . -)")
        return StatsRoot(root, s3_filesystem(), base, bucket)
    if "://" in root:
        raise ConfigError(f"{field}: got {root!r}; allowed: a local folder or s3://bucket/prefix")
    return StatsRoot(root, pafs.LocalFileSystem(), str(Path(root).expanduser().resolve()), None)


def partition_value(value: str) -> str:
    """``value`` as a hive path segment: URL-quoted (``/`` and ``=`` too), which both pyarrow
    and DuckDB decode back to ``value``."""
    return quote(value, safe="")


def partition_dir(base: str, run_id: str, module: str) -> str:
    return f"{base}/run_id={partition_value(run_id)}/module={partition_value(module)}"


def part_name(step: int) -> str:
    """``part-<step:010d>.parquet``: sorts by step; the same step always has the same name, so
    writing a step again (a resumed run replaying it) replaces its file instead of adding rows."""
    return f"part-{step:010d}.parquet"


def _boto3_client():
    import boto3
    from botocore.config import Config

    config = Config(
        s3={"addressing_style": "path"},
        connect_timeout=3,
        read_timeout=10,
        retries={"max_attempts": 1, "mode": "standard"},
    )
    return boto3.client("s3", endpoint_url=s3_endpoint(), config=config)


def ensure_bucket(bucket: str, field: str = "stats.root") -> None:
    """Create ``bucket`` unless it exists; ConfigError naming ``field`` when that is impossible."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    client = _boto3_client()
    where = f"S3 endpoint {s3_endpoint() or 'AWS default'}"
    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in ("403", "AccessDenied", "Forbidden"):
            raise ConfigError(
                f"{field}: bucket {bucket!r} at {where} refuses these credentials (403); "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            ) from None
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise ConfigError(
                f"{field}: bucket {bucket!r} at {where} cannot be checked: {redact(str(error))}"
            ) from None
    except (EndpointConnectionError, BotoCoreError) as error:
        raise ConfigError(
            f"{field}: {where} is unreachable ({type(error).__name__}: {redact(str(error))}); "
            "start the S3 service or set AWS_ENDPOINT_URL_S3 to a reachable endpoint"
        ) from None
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return
        raise ConfigError(
            f"{field}: bucket {bucket!r} does not exist at {where} and cannot be created ({redact(str(error))}); "
            "create it or use a bucket these credentials may write"
        ) from None
    except BotoCoreError as error:
        raise ConfigError(f"{field}: bucket {bucket!r} cannot be created at {where}: {redact(str(error))}") from None


def check_stats_root(root: str, field: str = "stats.root") -> StatsRoot:
    """Preflight before any worker starts: ``root`` exists (a missing S3 bucket is created) and
    accepts a write. Raises ConfigError naming ``field`` with the fix."""
    resolved = resolve_root(root, field)
    if resolved.is_s3:
        assert resolved.bucket is not None
        ensure_bucket(resolved.bucket, field)
        probe = f"{resolved.base}/.memel-preflight-{uuid.uuid4().hex[:8]}"
        try:
            with resolved.fs.open_output_stream(probe) as out:
                out.write(b"ok")
            resolved.fs.delete_file(probe)
        except OSError as error:
            raise ConfigError(f"{field}: got {root!r}; a test write failed: {redact(str(error))}") from None
        return resolved
    try:
        os.makedirs(resolved.base, exist_ok=True)
        probe = os.path.join(resolved.base, f".memel-preflight-{uuid.uuid4().hex[:8]}")
        with open(probe, "wb") as out:
            out.write(b"ok")
        os.remove(probe)
    except OSError as error:
        raise ConfigError(
            f"{field}: got {root!r}; the folder is not writable ({error.strerror or error}); "
            "choose a writable folder or s3://bucket/prefix"
        ) from None
    return resolved
