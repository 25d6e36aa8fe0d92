"""Which folder a run may write to: a new or empty one, or one memel already uses for this run."""

from __future__ import annotations

import json
from pathlib import Path

from memel import run_record
from memel.errors import ConfigError

#: A file memel writes first into every output folder it owns: a single run's or a sweep's record.
RECORDS = (run_record.RUN_FILE, run_record.SWEEP_FILE, run_record.STUDY_FILE)
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


def _owner(folder: Path) -> str | None:
    """The run or job name recorded in ``folder``, or None when memel never wrote there."""
    for name in RECORDS:
        record = folder / name
        if record.is_file():
            try:
                saved = json.loads(record.read_text())
            except (OSError, ValueError):
                return ""
            return str(saved.get("run_name") or saved.get("job") or saved.get("study") or "")
    return None


def check_output_dir(folder: Path, field: str = "output_dir") -> None:
    """``folder`` must be a folder that is absent, empty, or already memel's (a previous run of a
    job resumes there); raises ConfigError naming ``field`` otherwise. Nothing is written."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{field}: {folder} is a file, not a folder; choose a folder for the run's outputs")
    if not folder.exists() or _owner(folder) is not None:
        return
    content = [p.name for p in folder.iterdir() if p.name not in MEMEL_ENTRIES]
    if content:
        shown = ", ".join(sorted(content)[:3]) + (", ..." if len(content) > 3 else "")
        raise ConfigError(
            f"{field}: {folder} is not empty ({shown}) and holds no memel run; choose a new or empty folder "
            f"(memel would overwrite files there)"
        )
