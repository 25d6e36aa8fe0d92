"""The checkpoint scan and ``checkpoint.keep`` on local storage and on a real S3 server (SeaweedFS).

Checkpoint folders are laid out as a 2-rank ZeRO run writes them (every ``.pt`` a real torch
archive) and Ray's record as Ray writes it (the fields memel reads); the scan must find the newest
complete one whatever Ray's record says, skip incomplete ones with the reason, set aside a record
that lags, and prune the checkpoints Ray does not track beyond ``keep``.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs
import pytest
import torch
from distributed import run_distributed
from s3_server import s3_env

from memel import run_record
from memel.training.checkpoint_pruning import PruneUnrecorded
from memel.training.checkpoint_scan import (
    SNAPSHOT_FILE,
    RunFolder,
    newest_checkpoint,
    repair_snapshot,
    run_folder,
    scan_run,
)
from memel.training.runner import _report_resume_point

WORKERS = 2
BUCKET = "memel-checkpoints"
RUN = "job-0123456789"


@pytest.fixture(params=["local", "s3"])
def run(request: pytest.FixtureRequest, tmp_path) -> Iterator[RunFolder]:
    """An empty run folder under local storage, or under an S3 prefix of the test server."""
    if request.param == "local":
        yield run_folder(str(tmp_path / "checkpoints"), RUN)
        return
    server = request.getfixturevalue("s3_server")
    with s3_env(server):
        if BUCKET not in {b["Name"] for b in server.client().list_buckets()["Buckets"]}:
            server.client().create_bucket(Bucket=BUCKET)
        folder = run_folder(f"s3://{BUCKET}/{uuid.uuid4().hex}", RUN)
        assert isinstance(folder.fs, pafs.S3FileSystem)
        yield folder


def _archive(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _put(run: RunFolder, path: str, data: bytes) -> None:
    parent = run.join(path).rsplit("/", 1)[0]
    run.fs.create_dir(parent, recursive=True)
    with run.fs.open_output_stream(run.join(path)) as handle:
        handle.write(data)


def checkpoint(run: RunFolder, step: int, drop: str | None = None, truncate: str | None = None) -> str:
    """A 2-rank ZeRO checkpoint of ``step`` (named as Ray names them, in step order); ``drop`` leaves
    one file out, ``truncate`` cuts one short."""
    name = f"checkpoint_2026-12-04_10-00-{step:02d}.000000"
    tag = run_record.checkpoint_tag(step)
    state = run_record.CHECKPOINT_STATE_DIR
    files = {
        f"{state}/{run_record.PROGRESS_FILE}": json.dumps({"step": step, "tokens_seen": step, "tag": tag}).encode(),
        f"{state}/{run_record.REPORT_FILE}": json.dumps({"step": step}).encode(),
        f"{state}/{run_record.INHIBITION_FILE}": _archive({"m": {"count": torch.tensor(step)}}),
        f"{tag}/zero_pp_rank_0_mp_rank_00_model_states.pt": _archive({"module": {}}),
    }
    for rank in range(WORKERS):
        files[f"{state}/{run_record.loader_file(rank)}"] = json.dumps({"position": step}).encode()
        files[f"{state}/{run_record.rng_file(rank)}"] = _archive(torch.get_rng_state())
        files[f"{tag}/bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"] = _archive({"rank": rank, "x": [0.0] * 999})
    for path, data in files.items():
        if path == drop:
            continue
        _put(run, f"{name}/{path}", data[: len(data) // 2] if path == truncate else data)
    return name


def snapshot(run: RunFolder, names: list[str], latest: str | None) -> None:
    """Ray's record listing ``names`` (the fields memel reads, as Ray writes them)."""
    record = {
        "ray_version": "2.60.0",
        "checkpoint_results": [{"checkpoint_dir_name": name, "metrics": {}} for name in names],
        "checkpoint_report_indices": list(range(len(names))),
        "latest_checkpoint_result": {"checkpoint_dir_name": latest, "metrics": {}} if latest else None,
    }
    _put(run, SNAPSHOT_FILE, json.dumps(record).encode())


def _names(run: RunFolder, prefix: str) -> set[str]:
    """What is in ``run`` under names starting with ``prefix`` (a deleted folder holds no file; an
    S3 store may still list its empty prefix)."""
    listed = run.fs.get_file_info(pafs.FileSelector(run.path, recursive=True))
    files = [info.path[len(run.path) + 1 :] for info in listed if info.type == pafs.FileType.File]
    return {path.split("/")[0] for path in files if path.startswith(prefix)}


def test_the_newest_complete_checkpoint_wins_over_rays_record(run: RunFolder) -> None:
    c2, c4, c6 = (checkpoint(run, step) for step in (2, 4, 6))
    shard = f"{run_record.checkpoint_tag(8)}/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    c8 = checkpoint(run, 8, drop=shard)
    c10 = checkpoint(run, 10, truncate=f"{run_record.checkpoint_tag(10)}/zero_pp_rank_0_mp_rank_00_model_states.pt")
    snapshot(run, [c2, c4], latest=c4)  # Ray's record lags: c6 was written after it

    scan = scan_run(run, WORKERS)
    assert scan.newest is not None and (scan.newest.name, scan.newest.step) == (c6, 6)
    assert scan.skipped == {
        c8: "1 of 2 optimizer shards",
        c10: f"{run_record.checkpoint_tag(10)}/zero_pp_rank_0_mp_rank_00_model_states.pt truncated or unreadable",
    }
    import ray.train

    reported = ray.train.Checkpoint(run.join(c4), filesystem=run.fs)
    chosen = newest_checkpoint(run, WORKERS, reported)
    assert chosen.path == run.join(c6) and type(chosen.filesystem) is type(run.fs)
    with chosen.as_directory() as directory:  # what a worker restores from (downloaded from S3)
        assert json.loads(open(f"{directory}/memel/progress.json").read())["step"] == 6
    assert newest_checkpoint(run, WORKERS, ray.train.Checkpoint(run.join(c6), filesystem=run.fs)).path == run.join(c6)

    said = repair_snapshot(run, scan.newest)
    assert said is not None and f"out of date (its latest: {c4}; the newest complete: {c6})" in said
    assert not run.exists(SNAPSHOT_FILE) and len(_names(run, f"{SNAPSHOT_FILE}.stale-")) == 1


def test_a_record_at_the_newest_checkpoint_is_kept_and_a_corrupt_one_moved_aside(run: RunFolder) -> None:
    c2, c4 = checkpoint(run, 2), checkpoint(run, 4)
    snapshot(run, [c2, c4], latest=c4)
    assert repair_snapshot(run, scan_run(run, WORKERS).newest) is None and run.exists(SNAPSHOT_FILE)
    _put(run, SNAPSHOT_FILE, b"")  # what a full disk leaves
    said = repair_snapshot(run, scan_run(run, WORKERS).newest)
    assert said is not None and "was empty" in said
    assert len(_names(run, f"{SNAPSHOT_FILE}.corrupt-")) == 1


def test_checkpoints_ray_does_not_track_are_pruned_beyond_keep(run: RunFolder, capsys) -> None:
    c2, c4, c6 = (checkpoint(run, step) for step in (2, 4, 6))
    c8 = checkpoint(run, 8, drop=f"{run_record.CHECKPOINT_STATE_DIR}/{run_record.rng_file(1)}")
    snapshot(run, [c2], latest=c2)  # lags: the run resumes from c6, which Ray never recorded

    found, untracked = _report_resume_point(run, WORKERS, keep=2)
    assert found is not None and found.name == c6
    assert _names(run, "checkpoint_2") == {c4, c6, c8}, "c2 beyond keep=2; the incomplete c8 is left alone"
    assert untracked == [c6, c4]
    assert "resuming from the checkpoint of step 6" in capsys.readouterr().out

    # the resumed run writes c10 and c12 (Ray records them); rank 0 prunes after each report
    pruning = PruneUnrecorded(run, WORKERS, 2, untracked)
    c10 = checkpoint(run, 10)
    pruning.on_checkpoint(10, run.path, {})
    assert _names(run, "checkpoint_2") == {c6, c8, c10}
    c12 = checkpoint(run, 12)
    pruning.on_checkpoint(12, run.path, {})
    assert _names(run, "checkpoint_2") == {c8, c10, c12}
    assert "deleted checkpoint" in capsys.readouterr().out
    assert list(scan_run(run, WORKERS).skipped) == [c8], "a deleted checkpoint is gone, not incomplete"


def _report_with_a_late_rank(rank: int, world: int, storage: str, newest: str, shard: str, untracked: list) -> None:
    """Rank 1 uploads its optimizer shard of the newest checkpoint a second after rank 0 reported it."""
    run = run_folder(storage, RUN)
    assert run is not None
    pruning = PruneUnrecorded(run, WORKERS, 2, untracked, rank)
    if rank == 1:
        time.sleep(1.0)
        _put(run, f"{newest}/{shard}", _archive({"rank": 1}))
    pruning.on_checkpoint(6, run.path, {})


def test_pruning_waits_for_every_rank_to_upload_the_newest_checkpoint(tmp_path) -> None:
    """Each rank uploads its own files: rank 0 prunes only once all have reported, so a slow rank's
    newest checkpoint counts among the kept ones and the oldest untracked checkpoint goes."""
    storage = str(tmp_path / "checkpoints")
    run = run_folder(storage, RUN)
    assert run is not None
    c2, c4 = checkpoint(run, 2), checkpoint(run, 4)
    shard = f"{run_record.checkpoint_tag(6)}/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    c6 = checkpoint(run, 6, drop=shard)
    run_distributed(_report_with_a_late_rank, WORKERS, storage, c6, shard, [c4, c2])
    assert [found.name for found in scan_run(run, WORKERS).complete] == [c6, c4]
    assert _names(run, "checkpoint_2") == {c4, c6}, "c2 beyond keep=2 once c6 was complete"


def test_checkpoints_in_rays_record_are_left_to_ray(run: RunFolder) -> None:
    c2, c4, c6 = (checkpoint(run, step) for step in (2, 4, 6))
    snapshot(run, [c2, c6], latest=c6)  # up to date: c4 fell out of Ray's record but was never deleted
    found, untracked = _report_resume_point(run, WORKERS, keep=1)
    assert found is not None and found.name == c6 and run.exists(SNAPSHOT_FILE)
    assert _names(run, "checkpoint_2") == {c2, c6}, "c4 pruned; c2 is Ray's to delete"
    assert untracked == []
