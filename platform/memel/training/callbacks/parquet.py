"""Per-neuron snapshots to the Parquet statistics sink (rank 0), one table per module and step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memel.stats import ParquetStatsSink, snapshot_table

from .base import FAILED_CLOSE_TIMEOUT, Callback, stored_before_checkpoint


@dataclass(frozen=True)
class RunColumns:
    """The run-level columns every statistics row carries (``memel.stats.schema``)."""

    run_id: str | None
    model: str
    n_params: int
    mode: str
    strength: float
    top_n: int
    seed: int
    layout: str
    preset: str
    select: str


class StatsSinkCallback(Callback):
    """Submits each snapshot to a :class:`ParquetStatsSink`; on close, waits for its writes."""

    def __init__(
        self,
        sink: ParquetStatsSink,
        columns: RunColumns,
        depths: Mapping[str, float],
        close_timeout: float = 120,
        checkpoint_wait: float = 60,
    ) -> None:
        self.sink, self.columns, self.depths, self.close_timeout = sink, columns, depths, close_timeout
        self.checkpoint_wait = checkpoint_wait

    def on_snapshot(self, step: int, snapshots: Mapping[str, Any], tokens_seen: int) -> None:
        c = self.columns
        for name, snap in snapshots.items():
            table = snapshot_table(
                snap,
                run_id=c.run_id,
                model=c.model,
                n_params=c.n_params,
                mode=c.mode,
                strength=c.strength,
                top_n=c.top_n,
                seed=c.seed,
                step=step,
                tokens_seen=tokens_seen,
                module=name,
                depth=self.depths[name],
                layout=c.layout,
                preset=c.preset,
                select=c.select,
            )
            self.sink.submit(table, module=name, step=step)

    def on_checkpoint(self, step: int, directory: Path, metrics: Mapping[str, Any]) -> None:
        stored_before_checkpoint(self.sink, step, self.checkpoint_wait, "statistics")

    def close(self, failed: bool = False) -> None:
        self.sink.close(timeout=min(self.close_timeout, FAILED_CLOSE_TIMEOUT) if failed else self.close_timeout)
