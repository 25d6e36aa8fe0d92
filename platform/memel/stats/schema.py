"""The Arrow schema of per-neuron statistics, one row per neuron per module per snapshot.

Columns (``STATS_SCHEMA``, in this order):

- ``run_id`` (string): the training run; also the first hive partition (``run_id=<run>``).
- ``model`` (string): model name as given to ``memel.models.build`` (e.g. ``pythia-70m``).
- ``n_params`` (int64): the model's exact parameter count.
- ``mode`` (string): inhibition mode (``rd``, ``naive_a``, ``naive_b``, ``original``).
- ``strength`` (float64): Reverse Deactivation strength D.
- ``top_n`` (int32): values selected per sample.
- ``seed`` (int64): the run's random seed.
- ``step`` (int64): optimizer step at which the snapshot was taken.
- ``tokens_seen`` (int64): training tokens (or samples) seen up to ``step``, all ranks together.
- ``module`` (string): the inhibited target's name in the model (e.g. ``layers.3.mlp.act``);
  also the second hive partition (``module=<url-quoted name>``).
- ``depth`` (float32): relative position of the module in the model, 0 (first) to 1 (last).
- ``neuron`` (int32): flat neuron index (row-major over the Inhibitor's neuron shape).
- ``mean``, ``var`` (float32): the neuron's running mean and unbiased variance (history).
- ``count`` (int64): samples merged into the neuron's statistics so far (all of them: the forget step
  caps their weight in the mean and variance, not this count).
- ``batches`` (int64): batches merged into the module's history so far.
- ``selected_count`` (int64): times one of the neuron's values was in a sample's top-n MS
  since the previous snapshot (whether modified or not).
- ``inhibited_count`` (int64): times a value was modified since the previous snapshot.
- ``max_ms``, ``mean_ms`` (float32): largest and mean Monosemantic Scale since the previous
  snapshot.
- ``frac_above`` (float32): fraction of tracked samples whose MS exceeded ``ms_threshold``.
- ``layout`` (string): the Inhibitors' layout, ``channel`` (neurons along the last dim, each
  token or position a sample) or ``element`` (each position x channel its own neuron, one
  sample per sequence or image); what ``neuron`` indexes and what top-n is per.
- ``preset`` (string): the model preset the targets came from (e.g. ``paper``, ``mlp``), or
  ``custom`` for explicit ``model.targets``.
- ``select`` (string): the selection rule, ``top_n`` (``top_n`` values per sample) or ``threshold``.

The last three columns were added after the others: files written before them lack them, and
readers that union by name (``memel analyze``) give those rows nulls.

Files written by :class:`memel.stats.ParquetStatsSink` hold every column except the
partition keys ``run_id`` and ``module`` (``FILE_SCHEMA``): both readers take those from
the path, and a copy inside the file would clash with the type a reader infers for a
partition whose values all look like integers.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from memel.inhibition import Snapshot

PARTITION_KEYS = ("run_id", "module")

STATS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("model", pa.string()),
        ("n_params", pa.int64()),
        ("mode", pa.string()),
        ("strength", pa.float64()),
        ("top_n", pa.int32()),
        ("seed", pa.int64()),
        ("step", pa.int64()),
        ("tokens_seen", pa.int64()),
        ("module", pa.string()),
        ("depth", pa.float32()),
        ("neuron", pa.int32()),
        ("mean", pa.float32()),
        ("var", pa.float32()),
        ("count", pa.int64()),
        ("batches", pa.int64()),
        ("selected_count", pa.int64()),
        ("inhibited_count", pa.int64()),
        ("max_ms", pa.float32()),
        ("mean_ms", pa.float32()),
        ("frac_above", pa.float32()),
        ("layout", pa.string()),
        ("preset", pa.string()),
        ("select", pa.string()),
    ]
)

#: What each Parquet file holds: the partition keys live in the path only.
FILE_SCHEMA = pa.schema([field for field in STATS_SCHEMA if field.name not in PARTITION_KEYS])

#: Columns worth dictionary-encoding (constant per table, or few distinct values); the
#: float columns are unique per neuron, so trying a dictionary on them halves write speed.
DICTIONARY_COLUMNS = [
    "model",
    "n_params",
    "mode",
    "strength",
    "top_n",
    "seed",
    "step",
    "tokens_seen",
    "depth",
    "count",
    "batches",
    "selected_count",
    "inhibited_count",
    "layout",
    "preset",
    "select",
]

#: Explicit hive partitioning (both keys strings) for readers that want exact types.
PARTITIONING = pa.schema([("run_id", pa.string()), ("module", pa.string())])


def _constant(value: object, type_: pa.DataType, rows: int) -> pa.Array:
    """``value`` repeated ``rows`` times (a take from a 1-element array: no Python loop)."""
    return pc.take(pa.array([value], type=type_), pa.array(np.zeros(rows, dtype=np.int32)))


def _column(values: object, type_: pa.DataType) -> pa.Array:
    array = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)
    return pa.array(np.ascontiguousarray(array.reshape(-1)).astype(type_.to_pandas_dtype(), copy=False), type=type_)


def snapshot_table(
    snapshot: Snapshot,
    *,
    run_id: str,
    model: str,
    n_params: int,
    mode: str,
    strength: float,
    top_n: int,
    seed: int,
    step: int,
    tokens_seen: int,
    module: str,
    depth: float,
    layout: str | None = None,
    preset: str | None = None,
    select: str | None = None,
) -> pa.Table:
    """One row per neuron of ``snapshot`` with the run's context, in ``STATS_SCHEMA``
    (``layout``/``preset``/``select`` left out are written as nulls: unknown)."""
    rows = int(snapshot.mean.numel())
    constants = {
        "run_id": run_id,
        "model": model,
        "n_params": n_params,
        "mode": mode,
        "strength": strength,
        "top_n": top_n,
        "seed": seed,
        "step": step,
        "tokens_seen": tokens_seen,
        "module": module,
        "depth": depth,
        "batches": snapshot.batches,
        "layout": layout,
        "preset": preset,
        "select": select,
    }
    per_neuron = {
        "neuron": np.arange(rows, dtype=np.int32),
        "mean": snapshot.mean,
        "var": snapshot.var,
        "count": snapshot.count,
        "selected_count": snapshot.selected_count,
        "inhibited_count": snapshot.inhibited_count,
        "max_ms": snapshot.max_ms,
        "mean_ms": snapshot.mean_ms,
        "frac_above": snapshot.frac_above,
    }
    columns = []
    for field in STATS_SCHEMA:
        if field.name in constants:
            columns.append(_constant(constants[field.name], field.type, rows))
        else:
            array = _column(per_neuron[field.name], field.type)
            if len(array) != rows:
                raise ValueError(f"Snapshot.{field.name} has {len(array)} values, expected {rows} (one per neuron)")
            columns.append(array)
    return pa.Table.from_arrays(columns, schema=STATS_SCHEMA)
