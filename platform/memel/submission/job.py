"""A submission, planned locally: the validated job, its deterministic id, entrypoint and runtime_env."""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import SubmissionError
from .runtime_env import (
    DEFAULT_EXCLUDES,
    build_runtime_env,
    find_project_root,
    forwarded_env,
    pinned_requirements,
)
from .upload import as_excludes, left_out

Command = Literal["run", "tune", "train"]
COMMANDS: tuple[Command, ...] = ("run", "tune", "train")

#: The program the entrypoint runs on the cluster (from the shipped working_dir).
PROGRAM = ("memel",)
ID_PREFIX = "memel-"


@dataclass(frozen=True)
class SubmitRequest:
    """What the user asked for."""

    job_file: Path
    address: str
    command: Command = "run"
    overrides: tuple[str, ...] = ()
    env_names: tuple[str, ...] = ()
    pip: bool = False
    includes: tuple[str, ...] = ()  # project files uploaded even if git does not track them


@dataclass(frozen=True)
class JobPlan:
    """Everything sent to the cluster, computed without contacting it."""

    submission_id: str
    job_name: str
    entrypoint: str
    project_root: Path
    job_path: str  # relative to the project root, as the entrypoint names it
    runtime_env: dict[str, Any] = field(repr=False)
    metadata: dict[str, str] = field(default_factory=dict)
    left_out: tuple[str, ...] = ()  # project files not uploaded (see ``upload``)
    left_out_reason: str = ""
    withheld_env: tuple[str, ...] = ()  # secrets set here that the job does not carry (see ``forwarded_env``)

    @property
    def env_names(self) -> list[str]:
        """Names (only) of the forwarded environment variables."""
        return sorted(self.runtime_env.get("env_vars", {}))


def validate_job(command: Command, job_file: Path, overrides: list[str], address: str) -> str:
    """Validate the job spec exactly as ``memel <command>`` will on the cluster; return the job's name.

    The one place that knows each command's schema: ``train`` takes a training-run spec,
    ``run`` and ``tune`` a job spec (a run, sweep or study); ``tune`` also needs a tune section
    and study storage the workers can reach. Outputs must suit a cluster (no local paths).
    Raises ``memel.errors.ConfigError`` naming the field.
    """
    from memel.training import check_address_outputs

    if command == "train":
        from memel.training import load_spec

        spec = load_spec(job_file, overrides)
    else:
        from memel.orchestration import load_job

        spec = load_job(job_file, overrides)
    check_address_outputs(spec, address)
    if command == "tune":
        from memel.orchestration.study import check_study

        check_study(spec, address)
    return spec.name


def submission_id(job_name: str, command: str, content: bytes, overrides: list[str] | tuple[str, ...]) -> str:
    """``memel-<job name>-<hash>``: the same command, job file content and overrides give the same id."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"command": command, "overrides": list(overrides)}, sort_keys=True).encode())
    digest.update(b"\0")
    digest.update(content)
    return f"{ID_PREFIX}{job_name}-{digest.hexdigest()[:10]}"


def entrypoint(command: str, job_path: str, overrides: list[str] | tuple[str, ...]) -> str:
    """The shell command the cluster runs: ``memel <command> JOB.yaml --set k=v ...``."""
    args = [*PROGRAM, command, job_path]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)


def plan_job(request: SubmitRequest, environ: Mapping[str, str] | None = None) -> JobPlan:
    """Validate the job and build the submission; raises ConfigError or SubmissionError, never contacts the cluster."""
    job_file = request.job_file
    if not job_file.is_file():
        raise SubmissionError(f"no such job file {str(job_file)!r}")
    name = validate_job(request.command, job_file, list(request.overrides), request.address)
    root = find_project_root(job_file)
    try:
        job_path = job_file.resolve().relative_to(root).as_posix()
    except ValueError:
        raise SubmissionError(
            f"{str(job_file)!r} is outside the project root {root}, so it would not be shipped; move it under {root / 'jobs'}"
        ) from None
    _refuse_credentials(job_file, request.overrides)
    left, reason = left_out(root, keep=[job_path], includes=request.includes)
    forwarded, withheld = forwarded_env(request.env_names, environ)
    runtime_env = build_runtime_env(
        root,
        forwarded,
        pinned_requirements() if request.pip else None,
        excludes=[*DEFAULT_EXCLUDES, *as_excludes(left)],
    )
    return JobPlan(
        submission_id=submission_id(name, request.command, job_file.read_bytes(), request.overrides),
        job_name=name,
        entrypoint=entrypoint(request.command, job_path, request.overrides),
        project_root=root,
        job_path=job_path,
        runtime_env=runtime_env,
        metadata={"memel_job": name, "memel_command": request.command, "memel_file": job_path},
        left_out=tuple(left),
        left_out_reason=reason,
        withheld_env=tuple(withheld),
    )


def _refuse_credentials(job_file: Path, overrides: tuple[str, ...]) -> None:
    """Refuse credentials in the job file or an override: the file is uploaded, the overrides are the
    job's entrypoint, and Ray keeps both in the cluster's records and logs."""
    from memel.redaction import redact

    for item in overrides:
        if redact(item) != item:
            key = item.partition("=")[0]
            raise SubmissionError(
                f"--set {key}: holds credentials, which would travel in the job's entrypoint (Ray logs it); "
                "give the cluster MLFLOW_TRACKING_USERNAME/PASSWORD or AWS keys in its own environment instead"
            )
    text = job_file.read_text(errors="replace")
    if redact(text) != text:
        raise SubmissionError(
            f"{str(job_file)!r}: holds credentials (a user:password@ URI or a secret value), and the job file is "
            "uploaded to the cluster; move them to the cluster's own environment"
        )
