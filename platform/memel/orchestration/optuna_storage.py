"""Where a study's Optuna storage lives by default, and how to open it in optuna-dashboard
(opening a storage and building pruners: ``memel.training.trial``).

SQLite is for one trial at a time (it is not safe for parallel writers); parallel trials on one
machine default to a journal file, and parallel trials across machines need PostgreSQL or MySQL.
"""

from __future__ import annotations

from pathlib import Path

from memel.redaction import redact
from memel.training.trial import JOURNAL, make_pruner, open_storage

__all__ = ["JOURNAL", "dashboard_command", "default_storage", "make_pruner", "open_storage"]


def default_storage(out: Path, parallel: int) -> str:
    """SQLite in the job's output dir for one trial at a time, else a journal file there."""
    if parallel > 1:
        return f"{JOURNAL}{(out / 'optuna.journal').resolve()}"
    return f"sqlite:///{(out / 'optuna.db').resolve()}"


def dashboard_command(url: str) -> str:
    """How to open the study in optuna-dashboard."""
    if url.startswith(JOURNAL):
        return f"optuna-dashboard {'/' + url.removeprefix(JOURNAL).lstrip('/')}"
    return f"optuna-dashboard {redact(url)}"
