"""Throughput of the Parquet statistics sink: neuron rows per second, and how long ``submit``
holds the caller.

Builds realistic snapshot tables (an Inhibitor trained on a few random batches), then for
each of ``snapshots`` steps submits one table per module and finally flushes. Rows/s is
total rows divided by the wall time from the first submit to the end of the flush (encoding
and writing included); ``snapshot_table`` is timed separately.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from memel.inhibition import Inhibitor
from memel.stats import ParquetStatsSink, snapshot_table


@dataclass
class ParquetBenchResult:
    modules: int
    neurons: int
    snapshots: int
    rows: int
    seconds: float
    rows_per_s: float
    table_rows_per_s: float
    submit_median_us: float
    submit_max_us: float
    files: int


def bench_parquet(
    modules: int = 24, neurons: int = 4096, snapshots: int = 20, root: str | None = None, compression: str = "lz4"
) -> ParquetBenchResult:
    """Write ``snapshots`` x ``modules`` tables of ``neurons`` rows to ``root`` (a temp dir by default)."""
    generator = torch.Generator().manual_seed(0)
    snaps = []
    for _ in range(min(modules, 8)):  # distinct values per module: compression sees realistic data
        inhibitor = Inhibitor(mode="rd", top_n=4, late_start=1, forget_steps=4).train()
        for _ in range(3):
            inhibitor(torch.randn(4, 16, neurons, generator=generator))
        snaps.append(inhibitor.snapshot(reset=False))
    context = {
        "run_id": "bench",
        "model": "bench",
        "n_params": 1,
        "mode": "rd",
        "strength": 1.0,
        "top_n": 4,
        "seed": 0,
        "tokens_seen": 0,
    }
    start = time.perf_counter()
    tables = [
        [
            snapshot_table(
                snaps[m % len(snaps)], **context, step=s, module=f"layers.{m}.mlp.act", depth=m / max(modules - 1, 1)
            )
            for m in range(modules)
        ]
        for s in range(snapshots)
    ]
    table_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory(prefix="memel-bench-parquet-") as tmp:
        sink = ParquetStatsSink(root or tmp, "bench", compression=compression, max_buffer_bytes=8 * 2**30)
        waits = []
        start = time.perf_counter()
        for s, row in enumerate(tables):
            for m, table in enumerate(row):
                t0 = time.perf_counter()
                sink.submit(table, f"layers.{m}.mlp.act", s)
                waits.append(time.perf_counter() - t0)
        if not sink.close(timeout=600):
            raise RuntimeError("bench parquet: the sink did not finish writing")
        seconds = time.perf_counter() - start
        if sink.rows_dropped:
            raise RuntimeError(f"bench parquet: the sink dropped {sink.rows_dropped} rows (buffer full)")
    rows = modules * neurons * snapshots
    return ParquetBenchResult(
        modules,
        neurons,
        snapshots,
        rows,
        seconds,
        rows / seconds,
        rows / table_seconds,
        statistics.median(waits) * 1e6,
        max(waits) * 1e6,
        sink.files_written,
    )
