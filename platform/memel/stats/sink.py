"""A background writer of statistics tables to hive-partitioned Parquet, local or on S3.

Layout: ``<root>/run_id=<run>/module=<module>/part-<step:010d>.parquet`` (names
URL-quoted), columns ``FILE_SCHEMA`` (the partition keys come from the path). Read it
back with ``pyarrow.dataset.dataset(root, partitioning="hive")`` or DuckDB's
``read_parquet('<root>/**/*.parquet', hive_partitioning=true)``.

Guarantees:

- ``submit`` never waits on storage: it appends to an in-memory buffer and returns.
- Every file appears complete or not at all: locally it is written under a hidden temp
  name (``.part-....tmp``, ignored by both readers) in the same folder and renamed with
  ``os.replace``; on S3 the bytes are encoded in memory first and sent in one upload,
  which becomes visible only once complete.
- A failed write (endpoint down) stays buffered and is retried with exponential backoff
  (``retry_initial_s`` doubling up to ``retry_max_s``); nothing is lost as long as the
  endpoint comes back before ``close`` gives up.
- The buffer is bounded by ``max_buffer_bytes``: when it is full the **oldest** waiting
  tables are dropped (the newest data is kept) and a warning says how many rows were lost.
  Training is never blocked, at the price of losing old data during a long outage.
- Files use LZ4 (``compression``) and dictionary encoding only where it pays
  (``DICTIONARY_COLUMNS``): about twice the write speed of pyarrow's defaults.
- One file per (module, step), named after the step alone: a step written again (a resumed
  run replaying the steps after its last checkpoint) replaces its file, so no neuron row is
  ever duplicated. When the writer falls behind it still takes many waiting tables per round;
  of two tables for the same (module, step) waiting together, the later one is written.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Self

import pyarrow as pa
import pyarrow.parquet as pq

from memel.errors import ConfigError
from memel.redaction import redact

from .schema import DICTIONARY_COLUMNS, FILE_SCHEMA, PARTITION_KEYS
from .stats_root import StatsRoot, part_name, partition_dir, resolve_root

log = logging.getLogger("memel.stats")


@dataclass
class _Item:
    seq: int
    module: str
    step: int
    table: pa.Table
    nbytes: int


def check_run_id(run_id: str, field: str = "stats.run_id") -> str:
    """``run_id`` must be a non-empty string that is not all digits (readers would infer an
    integer partition column)."""
    if not isinstance(run_id, str) or not run_id.strip():
        raise ConfigError(f"{field}: got {run_id!r}; allowed: a non-empty string such as 'run-2024-01-01'")
    if run_id.strip().lstrip("+-").isdigit():
        raise ConfigError(
            f"{field}: got {run_id!r}; a run id made only of digits would be read back as an integer "
            f"partition: add a letter (e.g. 'run-{run_id}')"
        )
    return run_id


class ParquetStatsSink:
    """Writes statistics tables to ``root`` from a background thread (see the module doc).

    ``root`` is a local folder or ``s3://bucket/prefix``; call
    :func:`memel.stats.check_stats_root` once before training to fail early on a bad root.
    """

    def __init__(
        self,
        root: str,
        run_id: str,
        *,
        max_buffer_bytes: int = 256 * 2**20,
        max_batch_bytes: int = 64 * 2**20,
        compression: str = "lz4",
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
    ) -> None:
        self.root: StatsRoot = resolve_root(root)
        self.run_id = check_run_id(run_id)
        if max_buffer_bytes <= 0 or max_batch_bytes <= 0:
            raise ConfigError("stats.max_buffer_bytes / stats.max_batch_bytes: must be positive")
        self.max_buffer_bytes = max_buffer_bytes
        self.max_batch_bytes = max_batch_bytes
        self.compression = compression
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.rows_written = 0
        self.rows_dropped = 0
        self.files_written = 0
        self.last_error: str | None = None  # the latest failed write's error (redacted), for the closing warning
        self._queue: deque[_Item] = deque()
        self._inflight: list[_Item] = []
        self._queued_bytes = 0
        self._seq = 0
        self._cond = threading.Condition()
        self._stopping = False  # no new work: exit once the buffer is empty
        self._abandon = False  # exit now, even with data still buffered
        self._closed = False
        self._last_drop_warning = -1e9
        self._thread = threading.Thread(target=self._run, name=f"memel-stats-{run_id}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    def submit(self, table: pa.Table, module: str, step: int) -> None:
        """Queue one module's table for ``step`` and return at once (see the module doc)."""
        if self._closed:
            raise RuntimeError("ParquetStatsSink.submit after close()")
        if not isinstance(module, str) or not module:
            raise ValueError(f"module: got {module!r}; expected the module's name")
        drop = [name for name in PARTITION_KEYS if name in table.column_names]
        try:
            table = table.drop_columns(drop)
            if not table.schema.equals(FILE_SCHEMA):
                table = table.select(FILE_SCHEMA.names).cast(FILE_SCHEMA)
        except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise ValueError(
                f"table: does not match memel.stats.STATS_SCHEMA ({error}); build it with snapshot_table"
            ) from None
        dropped_rows = dropped_tables = 0
        with self._cond:
            self._seq += 1
            item = _Item(self._seq, module, int(step), table, table.nbytes)
            self._queue.append(item)
            self._queued_bytes += item.nbytes
            while self._queued_bytes > self.max_buffer_bytes and len(self._queue) > 1:
                old = self._queue.popleft()
                self._queued_bytes -= old.nbytes
                dropped_rows += old.table.num_rows
                dropped_tables += 1
            self.rows_dropped += dropped_rows
            self._cond.notify_all()
        if dropped_tables and time.monotonic() - self._last_drop_warning > 10.0:  # at most one warning per 10 s
            self._last_drop_warning = time.monotonic()
            log.warning(
                "stats buffer full (%.1f MiB, storage too slow or unreachable): dropping the oldest tables to keep "
                "the newest data; %d neuron rows dropped so far",
                self.max_buffer_bytes / 2**20,
                self.rows_dropped,
            )

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is written (or dropped); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._seq
            while self._oldest_pending() <= target:
                if not self._thread.is_alive():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 1.0)
            return True

    def close(self, timeout: float | None = 60.0) -> bool:
        """Flush (up to ``timeout``), then stop the writer; warns about anything left unwritten.
        True when everything submitted was written. Safe to call twice."""
        if self._closed:
            return not self._pending_rows()
        self._closed = True
        done = self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._abandon = not done
            self._cond.notify_all()
        self._thread.join(timeout=30)
        left = self._pending_rows()
        if self.rows_dropped:
            log.warning("stats sink closed: %d neuron rows were dropped while the buffer was full", self.rows_dropped)
        if left:
            log.warning(
                "stats sink closed with %d neuron rows not written to %s: %s; last error: %s",
                left,
                self.root.uri,
                self._pending_description(),
                self.last_error or "none (the writer ran out of time)",
            )
        return not left

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _oldest_pending(self) -> int:
        if self._inflight:
            return self._inflight[0].seq
        return self._queue[0].seq if self._queue else self._seq + 1

    def _pending_description(self) -> str:
        """Which statistics are still unwritten: run, steps and modules (the first few named)."""
        with self._cond:
            items = [*self._inflight, *self._queue]
        steps = sorted({item.step for item in items})
        modules = sorted({item.module for item in items})
        shown = ", ".join(modules[:4]) + (f" and {len(modules) - 4} more" if len(modules) > 4 else "")
        span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]} ({len(steps)} steps)"
        return f"run {self.run_id}, {span}, modules {shown}"

    def _pending_rows(self) -> int:
        with self._cond:
            return sum(item.table.num_rows for item in [*self._inflight, *self._queue])

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._abandon or (self._stopping and not self._queue):
                    return
                batch, size = [], 0
                while self._queue and (not batch or size + self._queue[0].nbytes <= self.max_batch_bytes):
                    item = self._queue.popleft()
                    self._queued_bytes -= item.nbytes
                    size += item.nbytes
                    batch.append(item)
                self._inflight = batch
            unwritten = self._write_batch(batch)
            with self._cond:
                self._inflight = unwritten  # non-empty only when abandoned: still counted as not written
                self._cond.notify_all()

    def _write_batch(self, batch: list[_Item]) -> list[_Item]:
        """Write ``batch``, retrying failures; returns the items left unwritten when abandoned."""
        latest: dict[tuple[str, int], _Item] = {}
        for item in batch:
            latest[(item.module, item.step)] = item  # a table sent again for its step replaces the earlier one
        pending = []
        for (module, step), item in latest.items():
            try:
                sink = pa.BufferOutputStream()
                pq.write_table(item.table, sink, compression=self.compression, use_dictionary=DICTIONARY_COLUMNS)
                pending.append((module, step, sink.getvalue(), item))
            except Exception:  # a bug, not an outage: retrying cannot help
                log.exception("stats: cannot encode %d rows of module %r; dropped", item.table.num_rows, module)
        delay, failures = self.retry_initial_s, 0
        while pending:
            module, step, data, item = pending[0]
            try:
                self._put(module, step, data)
            except Exception as error:  # noqa: BLE001 - any storage failure is retried
                failures += 1
                self.last_error = redact(f"{type(error).__name__}: {error}")
                if failures == 1 or failures % 10 == 0:
                    log.warning(
                        "stats: writing to %s failed (attempt %d, retrying in %.1fs; data kept in memory): %s",
                        self.root.uri,
                        failures,
                        delay,
                        redact(f"{type(error).__name__}: {error}"),
                    )
                with self._cond:
                    self._cond.wait_for(lambda: self._abandon, timeout=delay)
                    if self._abandon:
                        return [entry[3] for entry in pending]
                delay = min(delay * 2, self.retry_max_s)
                continue
            if failures:
                log.warning("stats: writing to %s works again after %d failed attempts", self.root.uri, failures)
                failures, delay = 0, self.retry_initial_s
            pending.pop(0)
            self.rows_written += item.table.num_rows
            self.files_written += 1
        return []

    def _put(self, module: str, step: int, data: pa.Buffer) -> None:
        """Write one complete file atomically."""
        folder = partition_dir(self.root.base, self.run_id, module)
        path = f"{folder}/{part_name(step)}"
        if self.root.is_s3:
            with self.root.fs.open_output_stream(path) as out:  # visible only once the upload completes
                out.write(data)
            return
        os.makedirs(folder, exist_ok=True)
        temp = f"{folder}/.{os.path.basename(path)}.tmp"
        try:
            with open(temp, "wb") as out:
                out.write(memoryview(data))
            os.replace(temp, path)
        except BaseException:
            try:
                os.remove(temp)
            except OSError:
                pass
            raise
