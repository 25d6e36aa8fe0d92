"""Monosemantic ratio: the fraction of neurons that are monosemantic, per run, step, rung, mode and depth.

A neuron counts as monosemantic at a snapshot when its Monosemantic Scale exceeded
``threshold`` for at least ``min_fraction`` of the samples since the previous snapshot
(column ``frac_above``; the training run measured it against its own ``ms_threshold``, so
with ``min_fraction > 0`` the threshold must be that one). With ``min_fraction = 0`` the
criterion is "in at least one sample", read from ``max_ms > threshold``, exact for any threshold.

The only pass over the dataset is :func:`module_steps`: one streaming DuckDB aggregation
(DuckDB's Parquet reader on a local root, Arrow's dataset scanner on S3; only the needed
columns, bounded memory) down to one row per run, module and snapshot; everything else works
on that small table.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import duckdb
import pandas as pd
import pyarrow.dataset as ds
from scipy import stats as scipy_stats

from memel.errors import ConfigError

#: What identifies a variant of the sweep (a point on the scale axis for one mode).
VARIANT_KEYS = ["model", "n_params", "label", "mode", "strength", "top_n"]


@dataclass(frozen=True)
class Criterion:
    """When a neuron counts as monosemantic at a snapshot (see the module doc)."""

    threshold: float = 9.0
    min_fraction: float = 0.01

    def __post_init__(self) -> None:
        if not (self.threshold > 0 and math.isfinite(self.threshold)):
            raise ConfigError(f"--threshold: got {self.threshold!r}; must be a finite number > 0")
        if not 0.0 <= self.min_fraction <= 1.0:
            raise ConfigError(f"--min-fraction: got {self.min_fraction!r}; must be in [0, 1]")

    def check_recorded(self, recorded: set[float]) -> None:
        """``frac_above`` was measured against the runs' ``ms_threshold``: a different threshold only
        works with ``min_fraction = 0`` (read from ``max_ms``)."""
        if self.min_fraction == 0 or not recorded:
            return
        if len(recorded) > 1:
            raise ConfigError(
                f"--threshold: the runs recorded frac_above at different ms_threshold values {sorted(recorded)}; "
                "use --min-fraction 0 (any sample above --threshold, from max_ms) to compare them"
            )
        (value,) = recorded
        if not math.isclose(value, self.threshold):
            raise ConfigError(
                f"--threshold: got {self.threshold:g}, but the runs recorded frac_above against ms_threshold={value:g}; "
                f"use --threshold {value:g}, or --min-fraction 0 (any sample above the threshold, read from max_ms)"
            )

    def sql(self) -> str:
        """A DuckDB boolean expression over one statistics row."""
        if self.min_fraction == 0:
            return f"max_ms > {float(self.threshold)!r}"
        return f"frac_above >= {float(self.min_fraction)!r}"

    def describe(self) -> str:
        if self.min_fraction == 0:
            return f"MS > {self.threshold:g} in at least one sample"
        return f"MS > {self.threshold:g} in at least {self.min_fraction:.3g} of samples"


def connect(memory_limit: str = "1GB", threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with bounded memory (spilling to a temp dir beyond it)."""
    con = duckdb.connect(":memory:")
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(f"SET threads = {int(threads or min(4, os.cpu_count() or 1))}")
    con.execute("SET preserve_insertion_order = false")
    con.execute("SET enable_progress_bar = false")
    return con


Stats = ds.Dataset | str


def register(con: duckdb.DuckDBPyConnection, stats: Stats, name: str, run_id: str | None = None) -> None:
    """Make ``stats`` queryable as view ``name``: a local root through DuckDB's own Parquet reader
    (faster), a pyarrow dataset (any filesystem, S3 included) through Arrow's scanner; both
    stream, read only the columns a query names and skip partitions filtered on ``run_id``."""
    if isinstance(stats, str):
        from memel.stats.storage import partition_value

        root = stats.rstrip("/").replace("'", "''")
        folder = f"run_id={partition_value(run_id)}/" if run_id is not None else ""
        con.execute(
            f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM read_parquet('{root}/{folder}**/*.parquet', "
            "hive_partitioning = true, hive_types = {'run_id': VARCHAR, 'module': VARCHAR}, union_by_name = true)"
        )
        return
    con.register(name, stats.filter(ds.field("run_id") == run_id) if run_id is not None else stats)


def unregister(con: duckdb.DuckDBPyConnection, stats: Stats, name: str) -> None:
    if isinstance(stats, str):
        con.execute(f"DROP VIEW IF EXISTS {name}")
    else:
        con.unregister(name)


def module_steps(
    stats: Stats, criterion: Criterion, con: duckdb.DuckDBPyConnection | None = None, labels: dict[str, str] | None = None
) -> pd.DataFrame:
    """One row per run, module and snapshot step: the run's context, ``neurons`` (rows), ``mono``
    (neurons meeting ``criterion``), mean MS, max MS and mean ``frac_above``. Streams the dataset
    (``stats``: a pyarrow dataset, or a local root folder). ``label`` is the run's sweep variant
    (``labels`` by run id, e.g. ``memel`` for ``{mode: rd, name: memel}``), else its mode."""
    con = con or connect()
    register(con, stats, "stats")
    query = f"""
        SELECT run_id, module, step,
               any_value(model) AS model, any_value(n_params) AS n_params, any_value(mode) AS mode,
               any_value(strength) AS strength, any_value(top_n) AS top_n, any_value(seed) AS seed,
               any_value(depth) AS depth, max(tokens_seen) AS tokens_seen,
               count(*) AS neurons, count_if({criterion.sql()}) AS mono,
               avg(mean_ms) AS mean_ms, max(max_ms) AS max_ms, avg(frac_above) AS frac_above
        FROM stats GROUP BY run_id, module, step ORDER BY run_id, module, step
    """
    frame = con.execute(query).df()
    unregister(con, stats, "stats")
    for column in ("neurons", "mono", "n_params", "seed", "top_n", "step", "tokens_seen"):
        frame[column] = frame[column].astype("int64")
    names = labels or {}
    label = [names.get(run, mode) for run, mode in zip(frame["run_id"], frame["mode"], strict=True)]
    frame.insert(int(frame.columns.get_loc("mode")), "label", pd.Series(label, index=frame.index, dtype=object))
    return frame


def run_steps(modules: pd.DataFrame) -> pd.DataFrame:
    """Per run and step, over all its modules: ``neurons``, ``mono`` and ``ratio`` = mono / neurons."""
    keys = ["run_id", *VARIANT_KEYS, "seed", "step"]
    frame = modules.groupby(keys, as_index=False).agg(
        neurons=("neurons", "sum"), mono=("mono", "sum"), tokens_seen=("tokens_seen", "max")
    )
    frame["ratio"] = frame["mono"] / frame["neurons"]
    return frame.sort_values(["n_params", "mode", "strength", "top_n", "seed", "step"]).reset_index(drop=True)


def final(runs: pd.DataFrame) -> pd.DataFrame:
    """Each run's last snapshot (one row per run)."""
    last = runs.groupby("run_id")["step"].transform("max")
    return runs[runs["step"] == last].reset_index(drop=True)


def mean_ci(values: pd.Series, level: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sample std, lower, upper) of a Student-t confidence interval; NaN bounds below 2 values."""
    array = values.dropna().to_numpy(dtype=float)
    n = len(array)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(array.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(array.std(ddof=1))
    half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def summarize(frame: pd.DataFrame, keys: list[str], column: str, prefix: str = "") -> pd.DataFrame:
    """Per group of ``keys``: count, mean, std and 95% CI of ``column`` (over seeds)."""
    rows = []
    for group, part in frame.groupby(keys, sort=True):
        mean, std, low, high = mean_ci(part[column])
        rows.append({**dict(zip(keys, group, strict=True)), f"{prefix}n": int(part[column].notna().sum()),
                     f"{prefix}mean": mean, f"{prefix}std": std, f"{prefix}ci_low": low, f"{prefix}ci_high": high})  # fmt: skip
    return pd.DataFrame(rows, columns=[*keys, *(f"{prefix}{c}" for c in ("n", "mean", "std", "ci_low", "ci_high"))])


def add_variant(frame: pd.DataFrame) -> pd.DataFrame:
    """A ``variant`` column naming the sweep variant (``label``, else the mode), with D and top_n
    where the sweep varies them."""
    frame = frame.copy()
    vary_d = frame.loc[frame["mode"] == "rd", "strength"].nunique() > 1
    vary_n = frame["top_n"].nunique() > 1

    def name(row: pd.Series) -> str:
        text = str(row["label"]) if "label" in row and isinstance(row["label"], str) and row["label"] else str(row["mode"])
        if vary_d and row["mode"] == "rd":
            text += f" D={row['strength']:g}"
        if vary_n:
            text += f" n={row['top_n']}"
        return text

    frame["variant"] = frame.apply(name, axis=1) if len(frame) else pd.Series(dtype=str)
    return frame


def by_rung(finals: pd.DataFrame) -> pd.DataFrame:
    """Final monosemantic ratio per rung and variant over seeds (mean, std, 95% CI)."""
    return (
        add_variant(summarize(finals, VARIANT_KEYS, "ratio", "ratio_")).sort_values(["mode", "n_params"]).reset_index(drop=True)
    )


def over_steps(runs: pd.DataFrame) -> pd.DataFrame:
    """Monosemantic ratio per rung, variant and step over seeds."""
    return add_variant(summarize(runs, [*VARIANT_KEYS, "step"], "ratio", "ratio_"))


def depth_bins(modules: pd.DataFrame, bins: int) -> pd.DataFrame:
    """Final-snapshot ratio per rung, variant and relative-depth bin (``[i/bins, (i+1)/bins)``,
    the last bin closed): mono / neurons summed over the modules in the bin and the seeds."""
    if bins < 1:
        raise ConfigError(f"--depth-bins: got {bins}; must be >= 1")
    last = modules.groupby("run_id")["step"].transform("max")
    frame = modules[modules["step"] == last].copy()
    frame["depth_bin"] = (frame["depth"].astype(float) * bins).astype(int).clip(0, bins - 1)
    out = frame.groupby([*VARIANT_KEYS, "depth_bin"], as_index=False).agg(
        neurons=("neurons", "sum"), mono=("mono", "sum"), modules=("module", "nunique")
    )
    out["depth_low"] = out["depth_bin"] / bins
    out["depth_high"] = (out["depth_bin"] + 1) / bins
    out["ratio"] = out["mono"] / out["neurons"]
    return add_variant(out)


@dataclass
class RatioResult:
    """Every table of the monosemantic-ratio analysis."""

    criterion: Criterion
    modules: pd.DataFrame
    runs: pd.DataFrame
    finals: pd.DataFrame
    by_rung: pd.DataFrame
    over_steps: pd.DataFrame
    depth: pd.DataFrame


def analyze_ratio(
    stats: Stats,
    criterion: Criterion,
    bins: int = 5,
    con: duckdb.DuckDBPyConnection | None = None,
    labels: dict[str, str] | None = None,
) -> RatioResult:
    """All monosemantic-ratio tables from one streaming pass over ``stats`` (``labels``: see :func:`module_steps`)."""
    modules = module_steps(stats, criterion, con, labels)
    runs = run_steps(modules)
    finals = final(runs)
    return RatioResult(
        criterion, modules, runs, add_variant(finals), by_rung(finals), over_steps(runs), depth_bins(modules, bins)
    )


def top_neurons(stats: Stats, run_id: str, k: int, con: duckdb.DuckDBPyConnection | None = None) -> dict[str, list[int]]:
    """The ``k`` most monosemantic neurons of each module of ``run_id``: highest mean ``frac_above``
    over the run's snapshots, ties broken by the highest ``max_ms``, then the lower index."""
    if k < 1:
        raise ConfigError(f"--top-k: got {k}; must be >= 1")
    con = con or connect()
    try:
        register(con, stats, "run_stats", run_id)
    except duckdb.IOException:  # no files for this run
        return {}
    rows = con.execute(
        """
        SELECT module, neuron FROM (
            SELECT module, neuron, row_number() OVER (
                PARTITION BY module ORDER BY avg(frac_above) DESC, max(max_ms) DESC, neuron ASC) AS rank
            FROM run_stats GROUP BY module, neuron)
        WHERE rank <= ? ORDER BY module, rank
        """,
        [k],
    ).fetchall()
    unregister(con, stats, "run_stats")
    chosen: dict[str, list[int]] = {}
    for module, neuron in rows:
        chosen.setdefault(module, []).append(int(neuron))
    return chosen
