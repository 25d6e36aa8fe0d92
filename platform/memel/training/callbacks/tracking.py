"""Scalars to an experiment tracker (MLflow on rank 0): every metric hook, plus per-module
Monosemantic Scale summaries at each snapshot."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import FAILED_CLOSE_TIMEOUT, Callback, stored_before_checkpoint

if TYPE_CHECKING:
    from memel.tracking import Tracker


def module_metrics(snapshots: Mapping[str, Any]) -> dict[str, float]:
    """``ms/<module>/mean|max|frac_above`` and ``inhibited/<module>`` of each snapshot."""
    metrics: dict[str, float] = {}
    for name, snap in snapshots.items():
        metrics[f"ms/{name}/mean"] = float(snap.mean_ms.mean())
        metrics[f"ms/{name}/max"] = float(snap.max_ms.max())
        metrics[f"ms/{name}/frac_above"] = float(snap.frac_above.mean())
        metrics[f"inhibited/{name}"] = float(snap.inhibited_count.sum())
    return metrics


class TrackerCallback(Callback):
    """Logs to a :class:`memel.tracking.Tracker`; on close, waits for delivery (the driver ends the run)."""

    def __init__(self, tracker: Tracker, flush_timeout: float = 60, checkpoint_wait: float = 60) -> None:
        self.tracker, self.flush_timeout, self.checkpoint_wait = tracker, flush_timeout, checkpoint_wait

    def on_log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.tracker.log_metrics(metrics, step)

    def on_eval(self, step: int, metrics: Mapping[str, float]) -> bool:
        self.tracker.log_metrics(metrics, step)
        return False

    def on_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self.tracker.log_metrics(metrics, step)

    def on_snapshot(self, step: int, snapshots: Mapping[str, Any], tokens_seen: int) -> None:
        self.tracker.log_metrics(module_metrics(snapshots), step)

    def on_checkpoint(self, step: int, directory: Path, metrics: Mapping[str, Any]) -> None:
        stored_before_checkpoint(self.tracker, step, self.checkpoint_wait, "metrics")

    def close(self, failed: bool = False) -> None:
        self.tracker.flush(timeout=min(self.flush_timeout, FAILED_CLOSE_TIMEOUT) if failed else self.flush_timeout)
