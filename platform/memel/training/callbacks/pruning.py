"""Optuna pruning: report each evaluation's metric to the run's trial and stop when the study's
pruner says so. Held by rank 0 only; the loop shares its stop request with every rank."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..trial import TrialConfig, open_trial
from .base import Callback


class PruningCallback(Callback):
    """Reports ``config.metric`` at every evaluation that has it; True when the trial should be pruned."""

    def __init__(self, config: TrialConfig) -> None:
        self.config = config
        self._trial: Any = None

    def on_eval(self, step: int, metrics: Mapping[str, float]) -> bool:
        if self.config.metric not in metrics:
            return False
        if self._trial is None:
            self._trial = open_trial(self.config)
        self._trial.report(float(metrics[self.config.metric]), step)
        return bool(self._trial.should_prune())
