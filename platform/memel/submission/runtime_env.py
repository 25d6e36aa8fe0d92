"""What travels with a job: the project as ``working_dir``, memel's own code, forwarded
environment variables and (optionally) pinned requirements."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import SubmissionError

#: Tracking and S3 settings forwarded from the submitter's environment when set; the secret ones among them
#: are withheld (see ``forwarded_env``).
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)

#: gitwildmatch patterns left out of the upload (Ray also honours the project's .gitignore);
#: a leading "/" anchors a pattern at the project root.
DEFAULT_EXCLUDES = (
    ".git",
    "/runs",
    "/mlruns",
    "/.benchmarks",
    "/checkpoints",
    "__pycache__",
    "*.py[cod]",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".ipynb_checkpoints",
    ".venv",
    "/venv",
    "/build",
    "/dist",
    "/.gl",
    "/.whl",
)

#: Requirements kept exactly as memel declares them (a local build such as 2.13.0+cpu is not on PyPI).
KEEP_AS_DECLARED = ("torch",)

#: memel's package inside the project root, shipped as ``py_modules`` so the job runs the submitted code.
PACKAGE_DIR = Path("platform") / "memel"


def find_project_root(job_file: Path, cwd: Path | None = None) -> Path:
    """The nearest folder holding ``pyproject.toml`` and ``jobs/``: above the job file, else above ``cwd``."""
    for start in (job_file.resolve().parent, (cwd or Path.cwd()).resolve()):
        for folder in (start, *start.parents):
            if (folder / "pyproject.toml").is_file() and (folder / "jobs").is_dir():
                return folder
    raise SubmissionError(
        f"no project root (a folder with pyproject.toml and jobs/) above {str(job_file)!r} or the current folder; "
        "run memel submit from the project checkout"
    )


def forwarded_env(
    extra: Iterable[str] = (), environ: Mapping[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """(the ``FORWARDED_ENV`` variables that are set, plus every ``extra`` name, the secrets withheld).

    Ray writes a job's ``runtime_env`` to the cluster's job records and its runtime-env agent's log,
    so a secret (a variable whose name marks it as one, or the ``user:password@`` of a URI) never
    travels that way: a secret ``FORWARDED_ENV`` variable is withheld and named in the second item,
    a URI travels without its credentials, and an ``extra`` name that is a secret is refused.
    """
    from memel.redaction import redact, split_userinfo
    from memel.tracking import is_secret_key

    env = os.environ if environ is None else environ
    missing = [name for name in extra if name not in env]
    if missing:
        raise SubmissionError(
            f"--env {', '.join(missing)}: not set in this environment, so there is nothing to forward"
        )
    secret_extra = [name for name in extra if is_secret_key(name)]
    if secret_extra:
        raise SubmissionError(
            f"--env {', '.join(secret_extra)}: a secret, and Ray writes a job's environment to the cluster's logs; "
            "set it in the cluster's own environment instead (docs/operations.md, 'How secrets reach workers')"
        )
    forwarded: dict[str, str] = {}
    withheld: list[str] = []
    for name in dict.fromkeys([*FORWARDED_ENV, *extra]):
        if name not in env:
            continue
        value = env[name]
        if is_secret_key(name):
            withheld.append(name)
            continue
        if redact(value) != value:
            bare, _, _ = split_userinfo(value)
            if redact(bare) != bare:  # a secret elsewhere in it (a token in the query): withhold it all
                withheld.append(name)
                continue
            withheld.append(f"{name} credentials")
            value = bare
        forwarded[name] = value
    return forwarded, withheld


def pinned_requirements(distribution: str = "memel") -> list[str]:
    """memel's requirements (no extras) pinned to the versions installed here."""
    from packaging.requirements import Requirement

    pinned = []
    for line in metadata.requires(distribution) or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an optional extra (test tools)
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        if requirement.name in KEEP_AS_DECLARED:
            pinned.append(f"{requirement.name}{extras}{requirement.specifier}")
            continue
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            raise SubmissionError(
                f"--pip: {requirement.name} is a requirement of {distribution} but is not installed here"
            ) from None
        pinned.append(f"{requirement.name}{extras}=={installed}")
    return pinned


def build_runtime_env(
    project_root: Path,
    env_vars: Mapping[str, str],
    pip: list[str] | None = None,
    excludes: Iterable[str] = DEFAULT_EXCLUDES,
) -> dict[str, Any]:
    """The job's ``runtime_env``: the project as working_dir, memel's package, env vars, pip."""
    runtime_env: dict[str, Any] = {"working_dir": str(project_root), "excludes": list(excludes)}
    if (project_root / PACKAGE_DIR / "__init__.py").is_file():
        runtime_env["py_modules"] = [str(project_root / PACKAGE_DIR)]
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env
