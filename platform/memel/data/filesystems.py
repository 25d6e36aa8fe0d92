"""Local and ``s3://`` files through ``pyarrow.fs``.

S3 settings come from the environment only: ``AWS_ENDPOINT_URL_S3`` (or
``AWS_ENDPOINT_URL``) for a non-AWS endpoint such as ``http://127.0.0.1:8333``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_REGION``. Secrets are
never logged or put in error messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from .errors import DataError


@dataclass(frozen=True)
class FileRef:
    """One file: the filesystem, its path there, the user-facing URI and its size."""

    fs: pafs.FileSystem
    path: str
    uri: str
    size: int

    def read(self) -> bytes:
        """The whole file."""
        with self.fs.open_input_file(self.path) as handle:
            return handle.read()

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``."""
        with self.fs.open_input_file(self.path) as handle:
            return handle.read_at(length, offset)


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the standard AWS environment variables."""
    kwargs: dict[str, object] = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        if not host:
            scheme, host = "https", endpoint
        kwargs["endpoint_override"] = host.rstrip("/")
        kwargs["scheme"] = scheme
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs["access_key"] = key
        kwargs["secret_key"] = secret
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and in-filesystem path of a local path or ``s3://bucket/key``."""
    if uri.startswith("s3://"):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    if "://" in uri:
        raise DataError(f"paths: got {uri!r}; allowed: a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def list_files(uri: str, suffixes: tuple[str, ...], field: str = "paths") -> list[FileRef]:
    """Files at ``uri`` (a file, or every file below a folder/prefix) ending in ``suffixes``.

    Sorted by path so the result is deterministic. Errors name ``field`` when the path,
    or the S3 bucket, does not exist, or nothing matching is there.
    """
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound and uri.startswith("s3://"):
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise DataError(
                    f"{field}: got {uri!r}; S3 bucket {bucket!r} does not exist (or is not visible with these credentials)"
                )
        if info.type == pafs.FileType.File:
            infos = [info]
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        else:
            raise DataError(
                f"{field}: got {uri!r}; no such file or folder (allowed: an existing local path or s3://bucket/prefix)"
            )
    except OSError as error:
        raise DataError(f"{field}: got {uri!r}; cannot be read: {error}") from None
    prefix = "s3://" if uri.startswith("s3://") else ""
    files = [
        FileRef(fs, item.path, prefix + item.path, item.size or 0)
        for item in infos
        if item.type == pafs.FileType.File and item.path.lower().endswith(suffixes)
    ]
    if not files:
        raise DataError(f"{field}: got {uri!r}; no files ending in {', '.join(suffixes)} there (empty corpus)")
    return sorted(files, key=lambda ref: ref.path)
