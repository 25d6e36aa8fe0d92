"""Monosemantic ratio: the fraction of neurons that carry a sparse feature, per run, step, rung, mode and depth.

A neuron is monosemantic at a snapshot when its Monosemantic Scale exceeded ``threshold`` (T,
default 36: six standard deviations) on at least ``min_fraction`` (default 0.5%) of the samples
since the previous snapshot (column ``frac_above``, recorded by the run against its
``inhibition.ms_threshold``, so T must be that one). A sparse feature active on a fraction p
of the samples gives MS ~ (1 - p)/p on them, so it passes for p between ~0.5% and ~3%; a
featureless neuron (identity, ReLU, GELU or SiLU of Gaussian inputs) exceeds MS 36 on at most
1.3e-4 of its samples (:mod:`.monosemantic_null`).

The criterion is judged against that null for every module and snapshot: with ``n`` samples
since the previous snapshot (the growth of the ``count`` column), the chance that a featureless
neuron is flagged is P(Binomial(n, null rate) >= min_fraction * n). Only where it is at most
``alpha`` (default 1e-3) at n and at every larger count, and ``min_fraction`` is at least 5x the null rate, are the module's
neurons counted ("tested"); elsewhere the ratio is not measurable and is reported as missing,
never as a number. Each run's ratio comes with ``null_ratio`` (the expected flagged fraction if
every neuron were featureless) and ``p_value`` (one-sided binomial test of the flagged count
against it).

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
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
from scipy import stats as scipy_stats

from memel.errors import ConfigError

from .monosemantic_null import MARGIN, false_positive_rate, heaviest_shape, min_samples, null_rate

#: What identifies a variant of the sweep (a point on the scale axis for one mode).
VARIANT_KEYS = ["model", "n_params", "label", "mode", "strength", "top_n"]

#: A run's ratio is called significant when its p-value against the null is below this.
RUN_LEVEL = 0.05

#: The recommended recording threshold (``inhibition.ms_threshold``) for the ratio.
RECOMMENDED_THRESHOLD = 36.0


@dataclass(frozen=True)
class Criterion:
    """When a neuron counts as monosemantic at a snapshot (see the module doc)."""

    threshold: float = RECOMMENDED_THRESHOLD
    min_fraction: float = 0.005
    alpha: float = 1e-3

    def __post_init__(self) -> None:
        if not (self.threshold > 0 and math.isfinite(self.threshold)):
            raise ConfigError(f"--threshold: got {self.threshold!r}; must be a finite number > 0")
        if not 0.0 <= self.min_fraction <= 1.0:
            raise ConfigError(f"--min-fraction: got {self.min_fraction!r}; must be in [0, 1]")
        if not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"--alpha: got {self.alpha!r}; must be in (0, 1)")

    @property
    def null_rate(self) -> float:
        """The heaviest featureless neuron's P(MS > threshold)."""
        return null_rate(self.threshold)

    @property
    def calibrated(self) -> bool:
        """Whether ``min_fraction`` clears the null rate by :data:`MARGIN` (else nothing is measurable)."""
        return self.min_fraction >= MARGIN * self.null_rate

    def false_positive(self, samples: int) -> float:
        """Per-neuron false-positive rate on ``samples`` samples (``min_fraction = 0``: any sample above)."""
        return false_positive_rate(samples, self.min_fraction, self.null_rate)

    def min_samples(self) -> int | None:
        """The fewest samples per snapshot from which on the false-positive rate stays <= ``alpha``
        (None: never, the criterion is not calibrated)."""
        return min_samples(self.min_fraction, self.null_rate, self.alpha) if self.calibrated else None

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
        """A DuckDB boolean expression over one statistics row (frac_above is float32: a relative
        tolerance of 1e-6 keeps k/n == min_fraction in)."""
        if self.min_fraction == 0:
            return f"max_ms > {float(self.threshold)!r}"
        return f"frac_above >= {float(self.min_fraction) * (1 - 1e-6)!r}"

    def describe(self) -> str:
        if self.min_fraction == 0:
            return f"MS > {self.threshold:g} in at least one sample"
        return f"MS > {self.threshold:g} on at least {self.min_fraction:.3g} of samples"

    def null_text(self) -> str:
        """One sentence: the null, and whether the criterion clears it."""
        rate, shape = self.null_rate, heaviest_shape(self.threshold)
        text = f"a featureless neuron ({shape} of Gaussian inputs, the heaviest reference shape) exceeds MS {self.threshold:g} on {rate:.2g} of samples"
        if not self.calibrated:
            return (
                f"{text}, so a fraction of {self.min_fraction:.3g} does not tell a feature from noise: not measurable "
                f"(record inhibition.ms_threshold: {RECOMMENDED_THRESHOLD:g} and use --min-fraction >= {MARGIN * null_rate(RECOMMENDED_THRESHOLD):.2g})"
            )
        needed = self.min_samples()
        return (
            f"{text}; a module's snapshot is tested when a featureless neuron's chance of being flagged is <= {self.alpha:g}"
            + (f" (from {needed:,} samples per snapshot on)" if needed else "")
        )


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
        from memel.stats.stats_root import partition_value

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
    stats: Stats,
    criterion: Criterion,
    con: duckdb.DuckDBPyConnection | None = None,
    labels: dict[str, str] | None = None,
    track_every: dict[str, int] | None = None,
) -> pd.DataFrame:
    """One row per run, module and snapshot step: the run's context, ``neurons`` (rows), ``mono``
    (neurons meeting ``criterion``), mean MS, max MS and mean ``frac_above``; then ``samples`` (the
    samples the snapshot's trackers saw: the growth of ``count`` since the module's previous
    snapshot, divided by the run's ``track_every``), ``false_positive`` (a featureless neuron's
    chance of being flagged on that many samples) and ``tested`` (the criterion is calibrated and
    ``samples`` is at least :meth:`Criterion.min_samples`, from where the false-positive rate stays
    <= ``alpha``). Streams the dataset (``stats``: a pyarrow dataset, or a local
    root folder). ``label`` is the run's sweep variant (``labels`` by run id, e.g. ``memel`` for
    ``{mode: rd, name: memel}``), else its mode."""
    con = con or connect()
    register(con, stats, "stats")
    query = f"""
        SELECT run_id, module, step,
               any_value(model) AS model, any_value(n_params) AS n_params, any_value(mode) AS mode,
               any_value(strength) AS strength, any_value(top_n) AS top_n, any_value(seed) AS seed,
               any_value(depth) AS depth, max(tokens_seen) AS tokens_seen,
               count(*) AS neurons, count_if({criterion.sql()}) AS mono,
               avg(mean_ms) AS mean_ms, max(max_ms) AS max_ms, avg(frac_above) AS frac_above,
               max("count") AS total_count
        FROM stats GROUP BY run_id, module, step ORDER BY run_id, module, step
    """
    frame = con.execute(query).df()
    unregister(con, stats, "stats")
    for column in ("neurons", "mono", "n_params", "seed", "top_n", "step", "tokens_seen", "total_count"):
        frame[column] = frame[column].astype("int64")
    names = labels or {}
    label = [names.get(run, mode) for run, mode in zip(frame["run_id"], frame["mode"], strict=True)]
    frame.insert(int(frame.columns.get_loc("mode")), "label", pd.Series(label, index=frame.index, dtype=object))
    return add_null(frame, criterion, track_every)


def add_null(frame: pd.DataFrame, criterion: Criterion, track_every: dict[str, int] | None = None) -> pd.DataFrame:
    """``samples``, ``false_positive`` and ``tested`` of each module snapshot (see :func:`module_steps`)."""
    frame = frame.sort_values(["run_id", "module", "step"]).reset_index(drop=True)
    previous = frame.groupby(["run_id", "module"])["total_count"].shift(1).fillna(0).astype("int64")
    every = frame["run_id"].map(lambda run: max(1, int((track_every or {}).get(run, 1))))
    frame["samples"] = ((frame["total_count"] - previous).clip(lower=0) // every).astype("int64")
    rates = {int(n): criterion.false_positive(int(n)) for n in frame["samples"].unique()}
    frame["false_positive"] = frame["samples"].map(rates).astype(float)
    needed = criterion.min_samples()
    frame["tested"] = (frame["samples"] >= needed) if needed is not None else False
    return frame


def _ratio_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``ratio`` = mono / tested, ``null_ratio`` = expected flagged fraction under the null and the
    one-sided binomial ``p_value`` of ``mono`` against it (all NaN where nothing was tested)."""
    tested = frame["tested_neurons"].to_numpy(float)
    mono = frame["mono"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        frame["ratio"] = np.where(tested > 0, mono / tested, np.nan)
        frame["null_ratio"] = np.where(tested > 0, frame["null_mass"].to_numpy(float) / tested, np.nan)
    p = scipy_stats.binom.sf(mono - 1, tested.astype(np.int64), np.nan_to_num(frame["null_ratio"].to_numpy(float)))
    frame["p_value"] = np.where(tested > 0, np.where(mono > 0, p, 1.0), np.nan)
    return frame


def _tested_only(modules: pd.DataFrame) -> pd.DataFrame:
    frame = modules.copy()
    frame["tested_neurons"] = np.where(frame["tested"], frame["neurons"], 0)
    frame["mono"] = np.where(frame["tested"], frame["mono"], 0)
    frame["null_mass"] = np.where(frame["tested"], frame["false_positive"] * frame["neurons"], 0.0)
    return frame


def run_steps(modules: pd.DataFrame) -> pd.DataFrame:
    """Per run and step, over all its modules: ``neurons``, ``tested_neurons`` (in tested module
    snapshots), ``mono`` (flagged among them), ``ratio``, ``null_ratio`` and ``p_value``."""
    keys = ["run_id", *VARIANT_KEYS, "seed", "step"]
    frame = (
        _tested_only(modules)
        .groupby(keys, as_index=False)
        .agg(
            neurons=("neurons", "sum"),
            tested_neurons=("tested_neurons", "sum"),
            mono=("mono", "sum"),
            null_mass=("null_mass", "sum"),
            samples=("samples", "min"),
            tokens_seen=("tokens_seen", "max"),
        )
    )
    frame = _ratio_columns(frame).drop(columns="null_mass")
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
        rows.append(
            {
                **dict(zip(keys, group, strict=True)),
                f"{prefix}n": int(part[column].notna().sum()),
                f"{prefix}mean": mean,
                f"{prefix}std": std,
                f"{prefix}ci_low": low,
                f"{prefix}ci_high": high,
            }
        )
    return pd.DataFrame(rows, columns=[*keys, *(f"{prefix}{c}" for c in ("n", "mean", "std", "ci_low", "ci_high"))])


def add_variant(frame: pd.DataFrame) -> pd.DataFrame:
    """A ``variant`` column naming the sweep variant (``label``, else the mode), with D and top_n
    where the sweep varies them."""
    frame = frame.copy()
    vary_d = frame.loc[frame["mode"] == "rd", "strength"].nunique() > 1
    vary_n = frame["top_n"].nunique() > 1

    def name(row: pd.Series) -> str:
        text = (
            str(row["label"]) if "label" in row and isinstance(row["label"], str) and row["label"] else str(row["mode"])
        )
        if vary_d and row["mode"] == "rd":
            text += f" D={row['strength']:g}"
        if vary_n:
            text += f" n={row['top_n']}"
        return text

    frame["variant"] = frame.apply(name, axis=1) if len(frame) else pd.Series(dtype=str)
    return frame


def _with_significance(summary: pd.DataFrame, frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per group: ``runs``, ``significant_runs`` (p_value < RUN_LEVEL) and the largest ``null_ratio``."""
    counts = (
        frame.assign(significant=frame["p_value"] < RUN_LEVEL)
        .groupby(keys, as_index=False)
        .agg(runs=("run_id", "count"), significant_runs=("significant", "sum"), null_ratio_max=("null_ratio", "max"))
    )
    counts["significant_runs"] = counts["significant_runs"].astype("int64")
    return summary.merge(counts, on=keys, how="left")


def by_rung(finals: pd.DataFrame) -> pd.DataFrame:
    """Final monosemantic ratio per rung and variant over seeds (mean, std, 95% CI over the runs where
    it was measurable), with the number of runs, of runs significant against the null, and the null ratio."""
    summary = _with_significance(summarize(finals, VARIANT_KEYS, "ratio", "ratio_"), finals, VARIANT_KEYS)
    return add_variant(summary).sort_values(["mode", "n_params"]).reset_index(drop=True)


def over_steps(runs: pd.DataFrame) -> pd.DataFrame:
    """Monosemantic ratio per rung, variant and step over seeds."""
    keys = [*VARIANT_KEYS, "step"]
    return add_variant(_with_significance(summarize(runs, keys, "ratio", "ratio_"), runs, keys))


def depth_bins(modules: pd.DataFrame, bins: int) -> pd.DataFrame:
    """Final-snapshot ratio per rung, variant and relative-depth bin (``[i/bins, (i+1)/bins)``,
    the last bin closed): mono / tested neurons summed over the modules in the bin and the seeds."""
    if bins < 1:
        raise ConfigError(f"--depth-bins: got {bins}; must be >= 1")
    last = modules.groupby("run_id")["step"].transform("max")
    frame = _tested_only(modules[modules["step"] == last])
    frame["depth_bin"] = (frame["depth"].astype(float) * bins).astype(int).clip(0, bins - 1)
    out = frame.groupby([*VARIANT_KEYS, "depth_bin"], as_index=False).agg(
        neurons=("neurons", "sum"),
        tested_neurons=("tested_neurons", "sum"),
        mono=("mono", "sum"),
        null_mass=("null_mass", "sum"),
        modules=("module", "nunique"),
    )
    out["depth_low"] = out["depth_bin"] / bins
    out["depth_high"] = (out["depth_bin"] + 1) / bins
    return add_variant(_ratio_columns(out).drop(columns="null_mass"))


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
    track_every: dict[str, int] | None = None,
) -> RatioResult:
    """All monosemantic-ratio tables from one streaming pass over ``stats`` (``labels``, ``track_every``:
    see :func:`module_steps`)."""
    modules = module_steps(stats, criterion, con, labels, track_every)
    runs = run_steps(modules)
    finals = final(runs)
    return RatioResult(
        criterion, modules, runs, add_variant(finals), by_rung(finals), over_steps(runs), depth_bins(modules, bins)
    )


def top_neurons(
    stats: Stats, run_id: str, k: int, con: duckdb.DuckDBPyConnection | None = None
) -> dict[str, list[int]]:
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


def ratio_notes(result: RatioResult) -> list[str]:
    """What a reader must know before reading the ratio: whether it was measurable at all, and where not."""
    criterion, modules, finals = result.criterion, result.modules, result.finals
    if not criterion.calibrated:
        return [f"monosemantic ratio not measurable: {criterion.null_text()}"]
    notes = []
    if len(modules) and not modules["tested"].any():
        notes.append(
            f"monosemantic ratio not measurable: every module snapshot has fewer than {criterion.min_samples():,} samples "
            f"(at most {int(modules['samples'].max()):,}), too few to tell a feature from noise at a false-positive rate "
            f"<= {criterion.alpha:g}; take statistics snapshots less often (stats.every) or use larger batches"
        )
    elif len(finals):
        missing = int(finals["ratio"].isna().sum())
        if missing:
            notes.append(
                f"monosemantic ratio: {missing} of {len(finals)} runs have no final module snapshot with "
                f">= {criterion.min_samples():,} samples; their ratio is left out"
            )
        weak = finals[finals["ratio"].notna() & (finals["p_value"] >= RUN_LEVEL)]
        if len(weak):
            notes.append(
                f"monosemantic ratio: {len(weak)} of {len(finals)} runs are not significant against the "
                f"featureless null (p >= {RUN_LEVEL:g}); their ratio is indistinguishable from noise"
            )
    return notes


def final_ratios(
    stats_root: str, threshold: float, track_every: dict[str, int] | None = None
) -> dict[str, dict[str, float]]:
    """Per run id in the statistics at ``stats_root`` (local or ``s3://``): its final ``ratio``,
    ``p_value`` and ``null_ratio`` under the default criterion at ``threshold`` (the runs'
    ``ms_threshold``); NaN where not measurable. For summaries such as the sweep table."""
    from .source import open_stats

    stats: Stats = str(stats_root) if "://" not in str(stats_root) else open_stats(str(stats_root))
    criterion = Criterion(threshold=threshold)
    finals = analyze_ratio(stats, criterion, track_every=track_every).finals
    return {
        row["run_id"]: {k: float(row[k]) for k in ("ratio", "p_value", "null_ratio")}
        for row in finals.to_dict("records")
    }
