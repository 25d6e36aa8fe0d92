"""Errors of job submission; each message says what to do."""

from __future__ import annotations


class SubmissionError(Exception):
    """Bad input for a submission (no address, unreadable token file, unset --env variable...)."""


class ClusterError(SubmissionError):
    """The cluster could not be reached or refused a request."""


class ClusterAuthError(ClusterError):
    """The cluster answered 401 (no token sent) or 403 (token rejected)."""


class JobNotFound(ClusterError):
    """No job with that submission id on the cluster."""
