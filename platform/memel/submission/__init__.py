"""Submitting memel jobs to a Ray cluster through Ray's Job Submission API.

Small modules, each importable without Ray: ``job`` (validation, submission id, entrypoint,
the plan), ``runtime_env`` (what travels with the job), ``auth`` (the cluster token),
``client`` (the Job Submission client with memel's error wording), ``follow`` (logs and
waiting). Ray itself is imported only when a cluster is contacted.
"""

from .auth import ClusterToken, find_token
from .errors import ClusterAuthError, ClusterError, JobNotFound, SubmissionError
from .job import (
    COMMANDS,
    JobPlan,
    SubmitRequest,
    entrypoint,
    plan_job,
    submission_id,
    validate_job,
)
from .runtime_env import (
    DEFAULT_EXCLUDES,
    FORWARDED_ENV,
    build_runtime_env,
    find_project_root,
    pinned_requirements,
)

__all__ = [
    "COMMANDS",
    "DEFAULT_EXCLUDES",
    "FORWARDED_ENV",
    "ClusterAuthError",
    "ClusterError",
    "ClusterToken",
    "JobNotFound",
    "JobPlan",
    "SubmissionError",
    "SubmitRequest",
    "build_runtime_env",
    "entrypoint",
    "find_project_root",
    "find_token",
    "pinned_requirements",
    "plan_job",
    "submission_id",
    "validate_job",
]
