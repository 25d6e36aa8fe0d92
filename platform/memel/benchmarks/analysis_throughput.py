"""Aggregation throughput and peak memory on a generated statistics dataset (``memel bench analyze``).

:func:`generate` writes a dataset shaped like one Pythia-410M run (24 modules x 4,096 neurons
per snapshot) in the sink's layout and file schema, chunk by chunk (memory stays at one
chunk). Its ``frac_above`` has a known answer: neuron ``i`` is above any ``min_fraction`` in
(0.002, 0.05] exactly when ``i % 64 == 0``, so every snapshot has 64 monosemantic neurons per
module. :func:`measure` aggregates it in a fresh child process (the monosemantic-ratio pass and,
optionally, the per-neuron ranking used by the ablation) and reports rows/s and the child's
peak resident memory (``resource.getrusage``), checked against the known answer.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: One Pythia-410M run: 24 inserted modules (one per layer) x 4,096 neurons (d_ff = 4,096).
MODULES, NEURONS = 24, 4096
#: Snapshots for the full benchmark: 24 x 4,096 x 1,018 = 100,073,472 neuron rows.
FULL_SNAPSHOTS = math.ceil(100_000_000 / (MODULES * NEURONS))
RUN_ID = "bench-pythia-410m"
MONO_EVERY = 64
MARKER = "memel-bench-analyze: "


def _chunk(module: int, modules: int, steps: np.ndarray, neurons: int, rng: np.random.Generator) -> pa.Table:
    from memel.stats.schema import FILE_SCHEMA, _constant

    rows = len(steps) * neurons
    neuron = np.tile(np.arange(neurons, dtype=np.int32), len(steps))
    step = np.repeat(steps.astype(np.int64), neurons)
    mono = neuron % MONO_EVERY == 0
    frac = np.where(mono, 0.05 + 0.05 * rng.random(rows, dtype=np.float32), 0.002 * rng.random(rows, dtype=np.float32))
    constants = {
        "model": "pythia-410m",
        "n_params": 405_334_016,
        "mode": "rd",
        "strength": 1.0,
        "top_n": 1,
        "seed": 0,
        "layout": "channel",
        "preset": "mlp",
        "select": "top_n",
    }
    varying = {
        "step": step,
        "tokens_seen": step * 2_097_152,
        "depth": np.full(rows, module / max(modules - 1, 1), np.float32),
        "neuron": neuron,
        "mean": rng.standard_normal(rows, dtype=np.float32),
        "var": rng.exponential(1.0, rows).astype(np.float32),
        "count": step * 2_097_152,
        "batches": step,
        "selected_count": rng.poisson(2.0, rows),
        "inhibited_count": rng.poisson(2.0, rows),
        "max_ms": np.where(mono, 50.0, 8.0).astype(np.float32) + rng.random(rows, dtype=np.float32),
        "mean_ms": (0.9 + 0.2 * rng.random(rows, dtype=np.float32)),
        "frac_above": frac,
    }
    arrays = []
    for field in FILE_SCHEMA:
        if field.name in constants:
            arrays.append(_constant(constants[field.name], field.type, rows))
        else:
            arrays.append(
                pa.array(np.asarray(varying[field.name]).astype(field.type.to_pandas_dtype(), copy=False), field.type)
            )
    return pa.Table.from_arrays(arrays, schema=FILE_SCHEMA)


def generate(
    root: Path, snapshots: int, modules: int = MODULES, neurons: int = NEURONS, per_file: int = 50, seed: int = 0
) -> int:
    """Write ``snapshots`` x ``modules`` x ``neurons`` rows under ``root``; returns the row count."""
    from memel.stats.schema import DICTIONARY_COLUMNS
    from memel.stats.stats_root import part_name, partition_dir

    rng = np.random.default_rng(seed)
    rows = 0
    for module in range(modules):
        folder = Path(partition_dir(str(root), RUN_ID, f"layers.{module}.mlp.act"))
        folder.mkdir(parents=True, exist_ok=True)
        for first in range(0, snapshots, per_file):
            steps = np.arange(first + 1, min(first + per_file, snapshots) + 1) * 10
            table = _chunk(module, modules, steps, neurons, rng)
            temporary = folder / f".tmp-{uuid.uuid4().hex[:8]}"
            pq.write_table(table, temporary, compression="lz4", use_dictionary=DICTIONARY_COLUMNS)
            os.replace(temporary, folder / part_name(int(steps[0])))
            rows += table.num_rows
    return rows


@dataclass
class Measurement:
    rows: int
    seconds: float
    rows_per_s: float
    peak_rss_bytes: int
    baseline_rss_bytes: int
    groups: int
    verified: bool
    rank_seconds: float | None = None
    rank_peak_rss_bytes: int | None = None


def _child(root: str, memory_limit: str, threads: int, rank: bool, arrow: bool = False) -> dict:
    """Runs in the fresh child process: aggregate, then report time, memory and the check."""
    from memel.analysis.monosemantic_ratio import Criterion, analyze_ratio, connect, top_neurons
    from memel.analysis.source import open_stats

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux

    baseline = peak()
    dataset = open_stats(root) if arrow else str(Path(root).resolve())
    con = connect(memory_limit, threads or None)
    started = time.perf_counter()
    result = analyze_ratio(dataset, Criterion(9.0, 0.01), 5, con)
    seconds = time.perf_counter() - started
    modules = result.modules
    rows = int(modules["neurons"].sum())
    expected = np.ceil(modules["neurons"] / MONO_EVERY)
    out = {
        "rows": rows,
        "seconds": seconds,
        "peak": peak(),
        "baseline": baseline,
        "groups": len(modules),
        "verified": bool((modules["mono"] == expected).all()),
    }
    if rank:
        started = time.perf_counter()
        chosen = top_neurons(dataset, RUN_ID, 4, con)
        out["rank_seconds"] = time.perf_counter() - started
        out["rank_peak"] = peak()
        out["verified"] = out["verified"] and all(all(n % MONO_EVERY == 0 for n in v) for v in chosen.values())
    return out


def measure(
    root: Path, memory_limit: str = "1GB", threads: int = 0, rank: bool = False, arrow: bool = False
) -> Measurement:
    """Aggregate ``root`` in a fresh Python process and return its figures (``arrow``: through the
    pyarrow dataset scanner, the path S3 roots take, instead of DuckDB's Parquet reader)."""
    command = [
        sys.executable,
        "-m",
        "memel.benchmarks.analysis_throughput",
        str(root),
        memory_limit,
        str(threads),
        "1" if rank else "0",
        "1" if arrow else "0",
    ]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    found = json.loads(next(line for line in done.stdout.splitlines() if line.startswith(MARKER))[len(MARKER) :])
    return Measurement(
        rows=found["rows"],
        seconds=found["seconds"],
        rows_per_s=found["rows"] / max(found["seconds"], 1e-9),
        peak_rss_bytes=found["peak"],
        baseline_rss_bytes=found["baseline"],
        groups=found["groups"],
        verified=found["verified"],
        rank_seconds=found.get("rank_seconds"),
        rank_peak_rss_bytes=found.get("rank_peak"),
    )


if __name__ == "__main__":
    print(
        MARKER + json.dumps(_child(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1"))
    )
