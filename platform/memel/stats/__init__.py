"""Per-neuron statistics as hive-partitioned Parquet (local folder or ``s3://``)."""

from memel.redaction import redact

from .schema import (
    FILE_SCHEMA,
    PARTITION_KEYS,
    PARTITIONING,
    STATS_SCHEMA,
    snapshot_table,
)
from .sink import ParquetStatsSink, check_run_id
from .stats_root import check_stats_root, ensure_bucket, resolve_root

__all__ = [
    "FILE_SCHEMA",
    "PARTITIONING",
    "PARTITION_KEYS",
    "STATS_SCHEMA",
    "ParquetStatsSink",
    "check_run_id",
    "check_stats_root",
    "ensure_bucket",
    "redact",
    "resolve_root",
    "snapshot_table",
]
