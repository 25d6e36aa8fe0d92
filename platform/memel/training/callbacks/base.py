"""The hooks a training loop calls, and a list of callbacks that is itself one callback.

A callback does one job beside the loop (tracking, statistics, pruning, progress, tests'
fault injection); the loop never knows which ones it has. Hooks run on the rank that holds
the callback, in the order the callbacks were given; rank-0-only outputs are simply not
given to other ranks. A hook must not call collectives (ranks hold different callbacks).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: Seconds an output may take to deliver what it holds when the run failed (a broken folder or
#: endpoint would otherwise be retried for minutes; a resume writes those steps again anyway).
FAILED_CLOSE_TIMEOUT = 10.0


class Callback:
    """Every hook does nothing; a callback overrides the ones it needs."""

    def post_step(self, step: int) -> None:
        """After optimizer step ``step`` (counted from 1) and the statistics sync."""

    def on_log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Training metrics over the steps since the last log (``train/loss`` etc.)."""

    def on_eval(self, step: int, metrics: Mapping[str, float]) -> bool:
        """A periodic evaluation (``eval/loss`` etc.); True asks the loop to stop after this step."""
        return False

    def on_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Other scalars to record: the initial and final evaluations, the statistics' rank divergence."""

    def on_snapshot(self, step: int, snapshots: Mapping[str, Any], tokens_seen: int) -> None:
        """Per-neuron snapshots of every inserted module (``memel.Snapshot`` by module name)."""

    def on_checkpoint(self, step: int, directory: Path, metrics: Mapping[str, Any]) -> None:
        """A checkpoint was written to ``directory`` (deleted after the hook); ``metrics`` are the latest."""

    def close(self, failed: bool = False) -> None:
        """The run ended (``failed``: by an error, so waiting long on a broken output helps no one):
        deliver what is buffered."""


class CallbackList(Callback):
    """Callbacks called in order; a stop request from any of them counts, and all are asked."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def post_step(self, step: int) -> None:
        for callback in self.callbacks:
            callback.post_step(step)

    def on_log(self, step: int, metrics: Mapping[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_log(step, metrics)

    def on_eval(self, step: int, metrics: Mapping[str, float]) -> bool:
        answers = [callback.on_eval(step, metrics) for callback in self.callbacks]
        return any(answers)

    def on_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for callback in self.callbacks:
            callback.on_metrics(step, metrics)

    def on_snapshot(self, step: int, snapshots: Mapping[str, Any], tokens_seen: int) -> None:
        for callback in self.callbacks:
            callback.on_snapshot(step, snapshots, tokens_seen)

    def on_checkpoint(self, step: int, directory: Path, metrics: Mapping[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(step, directory, metrics)

    def close(self, failed: bool = False) -> None:
        """Close every callback, even when one raises (the first error is raised after)."""
        error: BaseException | None = None
        for callback in self.callbacks:
            try:
                callback.close(failed)
            except BaseException as raised:  # noqa: BLE001 - close the rest first
                error = error or raised
        if error is not None:
            raise error


def stored_before_checkpoint(output: Any, step: int, timeout: float, what: str) -> bool:
    """Wait up to ``timeout`` s for ``output`` (a tracker or sink with ``flush(timeout)``) to store
    what it was given, so that a checkpoint never covers outputs a resume would miss. Past it, warn
    and go on: what is not stored stays queued and is retried (nothing is dropped here), but a crash
    before it is stored loses it. True when everything was stored."""
    if output.flush(timeout=timeout):
        return True
    print(
        f"[memel] warning: step {step} checkpointed before its {what} were stored (waited {timeout:g} s, "
        "checkpoint.output_wait_s); they stay queued and are retried, but a crash before they are "
        "stored loses them",
        flush=True,
    )
    return False
