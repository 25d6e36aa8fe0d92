"""Shared pytest fixtures."""

from s3_server import s3_server  # noqa: F401  (session fixture: a real S3 server on 127.0.0.1)
