"""Optuna storage from a URL (RDB: SQLite, PostgreSQL, MySQL; or ``journal:///path``, a journal
file), pruners by name, and the trial handle a training worker reports to.

SQLite is for one trial at a time (it is not safe for parallel writers); parallel trials on one
machine default to a journal file, and parallel trials across machines need PostgreSQL or MySQL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memel.errors import ConfigError
from memel.redaction import redact

JOURNAL = "journal:///"


def default_storage(out: Path, parallel: int) -> str:
    """SQLite in the job's output dir for one trial at a time, else a journal file there."""
    if parallel > 1:
        return f"{JOURNAL}{(out / 'optuna.journal').resolve()}"
    return f"sqlite:///{(out / 'optuna.db').resolve()}"


def open_storage(url: str) -> Any:
    """The Optuna storage object for ``url`` (a journal file or an RDB)."""
    import optuna

    if url.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend

        path = Path("/" + url.removeprefix(JOURNAL).lstrip("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=None)
    except Exception as error:  # noqa: BLE001 - driver missing, server down: say which storage
        raise ConfigError(f"tune.storage: cannot open {redact(url)!r}: {type(error).__name__}: {error}") from None


def make_pruner(name: str) -> Any:
    """The study's pruner (storage does not keep it: the driver and every trial build it by name)."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"tune.pruner: got {name!r}; allowed: median, hyperband, none")


def open_trial(url: str, study_name: str, trial_id: int, pruner: str) -> Any:
    """A live handle on one trial of a study, with the study's pruner (what a training worker reports to)."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=open_storage(url), pruner=make_pruner(pruner))
    return optuna.trial.Trial(study, trial_id)


def dashboard_command(url: str) -> str:
    """How to open the study in optuna-dashboard."""
    if url.startswith(JOURNAL):
        return f"optuna-dashboard {'/' + url.removeprefix(JOURNAL).lstrip('/')}"
    return f"optuna-dashboard {redact(url)}"
