"""Which folder a run may write to: a new or empty one, or one memel already uses for this same spec.

A folder memel wrote holds one record (``run.json``, ``sweep.json`` or ``study.json``) naming
what runs there: a run's name carries its spec's fingerprint, a sweep's or study's record its
job's. Running the same spec again resumes in its folder; a folder that holds a run of another
spec (or another kind of job) is refused before anything is written, so two specs never mix
their checkpoints, statistics and MLflow runs in one folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from memel import run_record
from memel.errors import ConfigError

#: A file memel writes first into every output folder it owns: a single run's or a sweep's record.
RECORDS = (run_record.RUN_FILE, run_record.SWEEP_FILE, run_record.STUDY_FILE)
#: What each record's folder holds, as said in an error.
KINDS = {run_record.RUN_FILE: "a run", run_record.SWEEP_FILE: "a sweep", run_record.STUDY_FILE: "a study"}
#: What memel may have written before its record (an invocation stopped early leaves only these).
MEMEL_ENTRIES = frozenset(
    {
        ".memel.lock",
        "mlflow.db",
        "mlartifacts",
        "checkpoints",
        "stats",
        "members",
        "trials",
        "optuna.db",
        "optuna.journal",
    }
)


@dataclass(frozen=True)
class Claim:
    """What this invocation records in its output folder: the record file and the fields that
    identify its spec (a field a record lacks, written by an older memel, is not compared)."""

    record: str
    identity: dict[str, str] = field(default_factory=dict)


def run_claim(run_name: str) -> Claim:
    """A single run's (or sweep member's, or trial's) claim: its name, which carries its spec's fingerprint."""
    return Claim(run_record.RUN_FILE, {"run_name": run_name})


def _record(folder: Path) -> tuple[str, dict] | None:
    """The record file in ``folder`` and what it holds ({} when unreadable), or None when memel never wrote there."""
    for name in RECORDS:
        record = folder / name
        if record.is_file():
            try:
                saved = json.loads(record.read_text())
            except (OSError, ValueError):
                return name, {}
            return name, saved if isinstance(saved, dict) else {}
    return None


def _check_claim(folder: Path, found: tuple[str, dict], claim: Claim, field_name: str) -> None:
    name, saved = found
    mismatched = {key: saved.get(key) for key, value in claim.identity.items() if saved.get(key) not in (None, value)}
    if name == claim.record and not mismatched:
        return
    held = ", ".join(f"{key} {value}" for key, value in mismatched.items())
    wanted = ", ".join(f"{key} {claim.identity[key]}" for key in mismatched)
    detail = (
        f" ({held}; this spec has {wanted})" if mismatched else f" (it holds {name}; this is {KINDS[claim.record]})"
    )
    raise ConfigError(
        f"{field_name}: {folder} holds {KINDS[name]} of a different spec{detail}; memel would mix the two there. "
        f"Choose another folder (--set {field_name}=PATH, or another name: the default folder is runs/<name>), "
        f"or remove {folder} to start this spec over"
    )


def check_output_dir(folder: Path, field: str = "output_dir", claim: Claim | None = None) -> None:
    """``folder`` must be a folder that is absent, empty, or already memel's for this spec (a
    previous run of it resumes there); raises ConfigError naming ``field`` otherwise. With ``claim``
    a folder holding another spec's (or another kind's) record is refused too. Nothing is written."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{field}: {folder} is a file, not a folder; choose a folder for the run's outputs")
    if not folder.exists():
        return
    found = _record(folder)
    if found is not None:
        if claim is not None:
            _check_claim(folder, found, claim, field)
        return
    content = [p.name for p in folder.iterdir() if p.name not in MEMEL_ENTRIES]
    if content:
        shown = ", ".join(sorted(content)[:3]) + (", ..." if len(content) > 3 else "")
        raise ConfigError(
            f"{field}: {folder} is not empty ({shown}) and holds no memel run; choose a new or empty folder "
            f"(memel would overwrite files there)"
        )
