"""Per-neuron statistics as hive-partitioned Parquet: schema, round trips, atomicity, outages."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from s3_server import S3Server
from tcp_proxy import TcpProxy

import memel
from memel.errors import ConfigError
from memel.stats import STATS_SCHEMA, ParquetStatsSink, check_stats_root, snapshot_table

NEURONS = 64
MODULES = ["layers.0.mlp.act", "0", "enc/blocks.1 a=b"]  # a digit-only name and one needing escapes
CONTEXT = {
    "run_id": "run-a",
    "model": "byte-0.2m",
    "n_params": 123_456,
    "mode": "rd",
    "strength": 1.0,
    "top_n": 2,
    "seed": 7,
    "tokens_seen": 4096,
}


@pytest.fixture(scope="module")
def snap() -> memel.Snapshot:
    torch.manual_seed(0)
    inhibitor = memel.Inhibitor(mode="rd", top_n=2, late_start=2, forget_steps=4).train()
    for _ in range(5):
        inhibitor(torch.randn(4, 8, NEURONS) * torch.linspace(0.1, 3, NEURONS))
    return inhibitor.snapshot()


def tables(snap: memel.Snapshot, steps: range, run_id: str = "run-a") -> list[tuple[pa.Table, str, int]]:
    return [
        (snapshot_table(snap, **{**CONTEXT, "run_id": run_id}, step=s, module=m, depth=i / 2), m, s)
        for s in steps
        for i, m in enumerate(MODULES)
    ]


def set_s3_env(monkeypatch: pytest.MonkeyPatch, server: S3Server, endpoint: str | None = None) -> None:
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    if endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)


def test_layout_preset_and_selection_are_recorded(snap: memel.Snapshot, tmp_path: Path) -> None:
    """The run's layout, preset and selection ride on every row, and read back through the sink;
    rows written without them read as nulls (unknown), also beside rows that have them."""
    known = snapshot_table(
        snap, **CONTEXT, step=1, module="0", depth=0.0, layout="element", preset="paper", select="top_n"
    )
    unknown = snapshot_table(snap, **{**CONTEXT, "run_id": "run-old"}, step=1, module="0", depth=0.0)
    assert {name: set(known.column(name).to_pylist()) for name in ("layout", "preset", "select")} == {
        "layout": {"element"},
        "preset": {"paper"},
        "select": {"top_n"},
    }
    assert unknown.column("layout").null_count == NEURONS
    with ParquetStatsSink(str(tmp_path), "run-a") as sink:
        sink.submit(known, module="0", step=1)
    with ParquetStatsSink(str(tmp_path), "run-old") as sink:
        sink.submit(unknown, module="0", step=1)
    found = duckdb.sql(
        f"SELECT run_id, layout, preset, \"select\", count(*) AS n FROM read_parquet('{tmp_path}/**/*.parquet', "
        "hive_partitioning = true, union_by_name = true) GROUP BY ALL ORDER BY run_id"
    ).fetchall()
    assert found == [("run-a", "element", "paper", "top_n", NEURONS), ("run-old", None, None, None, NEURONS)]


def test_snapshot_table_matches_the_snapshot(snap: memel.Snapshot) -> None:
    table = snapshot_table(snap, **CONTEXT, step=10, module="layers.0.mlp.act", depth=0.25)
    assert table.schema.equals(STATS_SCHEMA)
    assert table.num_rows == NEURONS
    assert table.column("neuron").to_pylist() == list(range(NEURONS))
    for name in ("mean", "var", "count", "selected_count", "inhibited_count", "max_ms", "mean_ms", "frac_above"):
        np.testing.assert_array_equal(table.column(name).to_numpy(), getattr(snap, name).numpy(), err_msg=name)
    assert table.column("selected_count").to_numpy().sum() > 0
    assert table.column("inhibited_count").to_numpy().sum() > 0
    assert set(table.column("step").to_pylist()) == {10}
    assert set(table.column("module").to_pylist()) == {"layers.0.mlp.act"}
    assert set(table.column("depth").to_pylist()) == {0.25}
    assert set(table.column("batches").to_pylist()) == {snap.batches}
    assert table.schema.field("top_n").type == pa.int32() and table.schema.field("depth").type == pa.float32()


def check_dataset(dataset: ds.Dataset, expected_rows: int, run_ids: set[str]) -> None:
    table = dataset.to_table()
    assert table.num_rows == expected_rows
    assert set(table.column("module").to_pylist()) == set(MODULES)
    assert set(table.column("run_id").to_pylist()) == run_ids
    assert dataset.schema.field("module").type == pa.string()
    for field in STATS_SCHEMA:
        assert dataset.schema.field(field.name).type == field.type, field.name
    one = table.filter(
        (pa.compute.field("module") == "enc/blocks.1 a=b")
        & (pa.compute.field("step") == 1)
        & (pa.compute.field("run_id") == "run-a")
    )
    assert one.num_rows == NEURONS
    assert sorted(one.column("neuron").to_pylist()) == list(range(NEURONS))


def test_local_round_trip_pyarrow_and_duckdb(snap: memel.Snapshot, tmp_path: Path) -> None:
    root = tmp_path / "stats"
    with ParquetStatsSink(str(root), "run-a") as sink:
        for table, module, step in tables(snap, range(3)):
            sink.submit(table, module, step)
    with ParquetStatsSink(str(root), "run-b") as sink:
        for table, module, step in tables(snap, range(2), run_id="run-b"):
            sink.submit(table, module, step)
    expected = 5 * len(MODULES) * NEURONS
    check_dataset(ds.dataset(str(root), partitioning="hive"), expected, {"run-a", "run-b"})
    files = sorted(p.name for p in root.rglob("*") if p.is_file())
    assert all(name.startswith("part-") and name.endswith(".parquet") for name in files)
    assert (root / "run_id=run-a" / "module=enc%2Fblocks.1%20a%3Db").is_dir()
    query = f"SELECT run_id, module, count(*) AS n, sum(selected_count) AS s FROM read_parquet('{root}/**/*.parquet', hive_partitioning=true) GROUP BY ALL"
    rows = duckdb.sql(query).fetchall()
    assert {(r, m): n for r, m, n, _ in rows} == {
        (r, m): NEURONS * k for r, k in (("run-a", 3), ("run-b", 2)) for m in MODULES
    }
    total = duckdb.sql(f"SELECT count(*) FROM read_parquet('{root}/**/*.parquet', hive_partitioning=true)").fetchall()
    assert total == [(expected,)]


def test_no_partial_part_file_is_ever_visible(
    snap: memel.Snapshot, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "stats"
    seen: dict[str, int] = {}
    problems: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for path in root.rglob("part-*"):
                if str(path) in seen:
                    continue
                try:
                    seen[str(path)] = pq.read_metadata(path).num_rows
                except Exception as error:  # noqa: BLE001
                    problems.append(f"{path.name}: {error}")

    failures = {"left": 3}
    real_replace = os.replace

    def flaky_replace(src: str, dst: str) -> None:  # the disk "fails" after the temp file was written
        if failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    watcher = threading.Thread(target=watch, daemon=True)
    root.mkdir()
    watcher.start()
    sink = ParquetStatsSink(str(root), "run-a", retry_initial_s=0.01, retry_max_s=0.05, max_batch_bytes=1)
    for table, module, step in tables(snap, range(10)):
        sink.submit(table, module, step)
    assert sink.close(timeout=60)
    stop.set()
    watcher.join()
    assert failures["left"] == 0 and not problems
    assert sum(pq.read_metadata(p).num_rows for p in root.rglob("part-*")) == 10 * len(MODULES) * NEURONS
    assert not [p for p in root.rglob("*") if p.is_file() and not p.name.startswith("part-")]  # temp files cleaned
    assert set(seen.values()) == {NEURONS}


@pytest.mark.parametrize("one_batch", [False, True], ids=["as-they-come", "all-in-one-batch"])
def test_closing_with_unwritten_tables_names_them_and_the_last_error(
    snap: memel.Snapshot, tmp_path: Path, caplog: pytest.LogCaptureFixture, one_batch: bool
) -> None:
    """Storage that refuses every write (as a folder that became unwritable does): close reports
    failure and its warning names the run, the steps and the modules left, and why; also when the
    writer had taken every table into the batch it was retrying (nothing left waiting in the queue)."""
    sink = ParquetStatsSink(str(tmp_path), "run-a", retry_initial_s=0.01, retry_max_s=0.02)

    def refuse(module: str, step: int, data: object) -> None:
        raise PermissionError(13, "Permission denied", f"{tmp_path}/{module}")

    sink._put = refuse  # type: ignore[method-assign]
    with sink._cond if one_batch else contextlib.nullcontext():  # the writer waits for the lock, then takes all
        for module in ("layers.0.mlp.act", "layers.1.mlp.act"):
            for step in (5, 6, 7):
                sink.submit(snapshot_table(snap, **CONTEXT, step=step, module=module, depth=0.0), module, step)
    with caplog.at_level(logging.WARNING, logger="memel.stats"):
        assert not sink.close(timeout=0.5)
    assert sink.rows_written == 0
    assert not sink.close()  # asked again, it still says so
    assert "not written to" in caplog.text
    assert "run run-a, steps 5-7 (3 steps), modules layers.0.mlp.act, layers.1.mlp.act" in caplog.text
    assert "last error: PermissionError: [Errno 13] Permission denied" in caplog.text


def test_full_buffer_keeps_the_newest_and_warns(
    snap: memel.Snapshot, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = "layers.0.mlp.act"
    by_step = [snapshot_table(snap, **CONTEXT, step=s, module=module, depth=0.0) for s in range(10)]
    table = by_step[0]
    sink = ParquetStatsSink(
        str(tmp_path), "run-a", max_buffer_bytes=3 * table.nbytes, retry_initial_s=0.01, retry_max_s=0.02
    )
    gate = threading.Event()
    real_put = sink._put
    sink._put = lambda *a: (gate.wait(), real_put(*a))  # type: ignore[method-assign]  # storage stalls
    with caplog.at_level(logging.WARNING, logger="memel.stats"):
        start = time.perf_counter()
        for step in range(10):
            sink.submit(by_step[step], module, step)
        assert time.perf_counter() - start < 2  # never blocks on storage
        gate.set()
        assert sink.close(timeout=30)
    assert "buffer full" in caplog.text and "oldest" in caplog.text
    steps = sorted(ds.dataset(str(tmp_path), partitioning="hive").to_table().column("step").unique().to_pylist())
    assert steps[-3:] == [7, 8, 9] and len(steps) < 10  # the newest kept, older ones dropped
    assert sink.rows_dropped > 0


def test_s3_round_trip(snap: memel.Snapshot, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    set_s3_env(monkeypatch, s3_server)
    root = "s3://memel-stats-rt/experiments/a"
    check_stats_root(root)  # creates the bucket
    with ParquetStatsSink(root, "run-a") as sink:
        for table, module, step in tables(snap, range(3)):
            sink.submit(table, module, step)
    with ParquetStatsSink(root, "run-b") as sink:
        for table, module, step in tables(snap, range(2), run_id="run-b"):
            sink.submit(table, module, step)
    dataset = ds.dataset(root, partitioning="hive")
    check_dataset(dataset, 5 * len(MODULES) * NEURONS, {"run-a", "run-b"})
    keys = [
        o["Key"]
        for o in s3_server.client().list_objects_v2(Bucket="memel-stats-rt")["Contents"]
        if not o["Key"].endswith("/")
    ]
    assert all(k.split("/")[-1].startswith("part-") for k in keys), keys


def test_s3_outage_mid_run_loses_nothing(
    snap: memel.Snapshot, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    set_s3_env(monkeypatch, s3_server)
    check_stats_root("s3://memel-stats-outage")
    proxy = TcpProxy(int(s3_server.endpoint.rsplit(":", 1)[1])).start()
    try:
        set_s3_env(monkeypatch, s3_server, endpoint=proxy.url)
        root = "s3://memel-stats-outage/p"
        sink = ParquetStatsSink(root, "run-a", retry_initial_s=0.2, retry_max_s=1.0)
        batches = tables(snap, range(6))
        with caplog.at_level(logging.WARNING, logger="memel.stats"):
            for table, module, step in batches[:6]:
                sink.submit(table, module, step)
            assert sink.flush(timeout=60)
            proxy.stop()  # the endpoint goes down mid-run
            start = time.perf_counter()
            for table, module, step in batches[6:]:
                sink.submit(table, module, step)
            assert time.perf_counter() - start < 1.0  # training does not block
            assert not sink.flush(timeout=3)  # nothing can be written now
            assert "failed" in caplog.text
            proxy.start()  # and comes back
            assert sink.close(timeout=90)
        assert s3_server.secret_key not in caplog.text
        set_s3_env(monkeypatch, s3_server)
        assert ds.dataset(root, partitioning="hive").to_table().num_rows == len(batches) * NEURONS
    finally:
        proxy.stop()


def test_preflight_errors(tmp_path: Path, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"stats\.root.*not writable"):
        check_stats_root(str(blocker / "stats"))
    with pytest.raises(ConfigError, match=r"stats\.root.*local folder or s3://"):
        check_stats_root("gs://bucket/x")
    check_stats_root(str(tmp_path / "new" / "stats"))
    assert (tmp_path / "new" / "stats").is_dir()

    set_s3_env(monkeypatch, s3_server, endpoint="http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"stats\.root.*unreachable") as error:
        check_stats_root("s3://memel-stats-pre/x")
    assert time.perf_counter() - start < 30
    assert s3_server.secret_key not in str(error.value)

    set_s3_env(monkeypatch, s3_server)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123")
    with pytest.raises(ConfigError, match=r"stats\.root") as error:
        check_stats_root("s3://memel-stats-pre/x")
    assert "wrong-secret-value-123" not in str(error.value)

    set_s3_env(monkeypatch, s3_server)
    check_stats_root("s3://memel-stats-pre/x")  # missing bucket: created
    assert "memel-stats-pre" in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    with pytest.raises(ConfigError, match=r"stats\.root.*bucket name"):
        check_stats_root("s3://Bad_Bucket/x")


def test_run_id_and_table_are_checked(snap: memel.Snapshot, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"stats\.run_id"):
        ParquetStatsSink(str(tmp_path), "12345")
    with ParquetStatsSink(str(tmp_path), "run-a") as sink, pytest.raises(ValueError, match="STATS_SCHEMA"):
        sink.submit(pa.table({"x": [1]}), "m", 0)


def test_a_replayed_step_replaces_its_file(snap: memel.Snapshot, tmp_path: Path) -> None:
    """A run resumed from an older checkpoint writes the steps after it again: each (module, step)
    has one file, so the replay replaces it and no (run_id, module, step, neuron) row is duplicated."""
    root = tmp_path / "stats"
    with ParquetStatsSink(str(root), "run-a") as sink:  # killed after step 8 ...
        for table, module, step in tables(snap, range(1, 9)):
            sink.submit(table, module, step)
    with ParquetStatsSink(str(root), "run-a") as sink:  # ... resumed from the checkpoint of step 4
        for table, module, step in tables(snap, range(5, 13)):
            sink.submit(table, module, step)
        for table, module, step in tables(snap, range(12, 13)):  # the same step twice in one batch
            sink.submit(table, module, step)
    data = ds.dataset(str(root), partitioning="hive").to_table().to_pandas()
    assert len(data) == 12 * len(MODULES) * NEURONS
    assert not data.duplicated(["run_id", "module", "step", "neuron"]).any()
    assert sorted(data["step"].unique()) == list(range(1, 13))


def test_snapshot_with_a_short_field_is_refused_by_name(snap: memel.Snapshot) -> None:
    """A per-neuron field of the wrong length is named, with its length and the expected one."""
    short = dataclasses.replace(snap, max_ms=snap.max_ms[:3])
    with pytest.raises(ValueError, match=rf"Snapshot\.max_ms has 3 values, expected {NEURONS}"):
        snapshot_table(short, **CONTEXT, step=0, module="m", depth=0.0)
