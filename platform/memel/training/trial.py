"""An Optuna trial that a training run reports to: its typed address, the study's storage and
pruner by name, and a live handle opened with Optuna's public API.

Optuna storage URLs: an RDB (SQLite, PostgreSQL, MySQL) or ``journal:///path`` (a journal
file). The pruner is not kept in the storage, so the driver and every trial build it by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memel.errors import ConfigError
from memel.redaction import redact

JOURNAL = "journal:///"
PRUNERS = ("median", "hyperband", "none")


@dataclass(frozen=True)
class TrialConfig:
    """Which trial of which study a run is (plain values: it pickles and travels to workers).

    ``metric`` is the evaluation metric reported at every evaluation (e.g. ``eval/loss``),
    ``trial_number`` the trial's public number in its study.
    """

    storage: str
    study: str
    trial_number: int
    metric: str
    pruner: str = "median"


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
    """The study's pruner by name: ``median``, ``hyperband`` or ``none``."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"tune.pruner: got {name!r}; allowed: {', '.join(PRUNERS)}")


def open_trial(config: TrialConfig) -> Any:
    """A live ``optuna.trial.Trial`` for ``config``, with the study's pruner (public API only:
    the storage maps study name and trial number to the trial's id)."""
    import optuna

    storage = open_storage(config.storage)
    study = optuna.load_study(study_name=config.study, storage=storage, pruner=make_pruner(config.pruner))
    study_id = storage.get_study_id_from_name(config.study)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, config.trial_number)
    return optuna.trial.Trial(study, trial_id)
