"""The newest complete checkpoint of a run, found by looking at its storage folder (local or S3).

Ray Train remembers its checkpoints in ``checkpoint_manager_snapshot.json``, written after a
report is registered; a driver or worker killed in between leaves checkpoints in storage that the
snapshot does not list yet, and a full disk can leave the snapshot empty. Resuming from the
snapshot would then replay steps already logged, or fail. Here the run's folder itself is the
record: every ``checkpoint_*`` folder is checked, and the one with the highest step whose every
file is present and readable wins. A snapshot that Ray could not load, or whose latest checkpoint
is not that one, is moved aside before Ray starts, so Ray's record and the storage folder agree.

A checkpoint is complete when ``memel/progress.json`` names its step and DeepSpeed tag, the tag's
folder holds the model states, every rank's loader state, RNG state and (ZeRO) optimizer shard is
there, and every ``.pt`` file opens as a zip archive (a truncated file does not: its central
directory, at the end, is missing; on S3 only the archive's end is read). Storage is read through
``pyarrow.fs`` (:mod:`memel.data.filesystems`): a local path, ``file://`` or ``s3://``; any other
scheme keeps Ray's choice.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
import zipfile
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pyarrow.fs as pafs

from memel import run_record
from memel.data.filesystems import resolve

log = logging.getLogger("memel.training")

#: Ray Train's record of a run's checkpoints (``ray.train.v2._internal.constants``).
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
CHECKPOINT_PREFIX = "checkpoint_"
MEMEL_STATE = run_record.CHECKPOINT_STATE_DIR


@dataclass(frozen=True)
class RunFolder:
    """A run's storage folder: the filesystem and the path there (what Ray calls ``fs_path``)."""

    fs: pafs.FileSystem
    path: str

    def join(self, *names: str) -> str:
        return posixpath.join(self.path, *names)

    def read_text(self, *names: str) -> str:
        with self.fs.open_input_stream(self.join(*names)) as handle:
            return handle.read().decode()

    def exists(self, *names: str) -> bool:
        return self.fs.get_file_info(self.join(*names)).type != pafs.FileType.NotFound

    def listing(self, *names: str) -> list[pafs.FileInfo]:
        """What is directly inside ``names`` (nothing when it does not exist)."""
        return self.fs.get_file_info(pafs.FileSelector(self.join(*names), allow_not_found=True))

    def at(self, *names: str) -> RunFolder:
        return RunFolder(self.fs, self.join(*names))


def run_folder(storage: str, run_name: str) -> RunFolder | None:
    """The folder of run ``run_name`` under ``storage`` (a local path, ``file://`` or ``s3://``),
    or None for storage read only by Ray (``gs://`` and the like)."""
    if storage.startswith("file://"):
        storage = storage[len("file://") :]
    elif "://" in storage and not storage.startswith("s3://"):
        return None
    fs, path = resolve(storage)
    return RunFolder(fs, posixpath.join(path, run_name))


@dataclass(frozen=True)
class FoundCheckpoint:
    """A complete checkpoint: its folder and the step it holds."""

    folder: RunFolder
    step: int

    @property
    def path(self) -> str:
        return self.folder.path

    @property
    def name(self) -> str:
        return posixpath.basename(self.folder.path)


@dataclass
class Scan:
    """What a run folder holds: its complete checkpoints, newest first, and why others were skipped."""

    complete: list[FoundCheckpoint] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # folder name -> why it is incomplete

    @property
    def newest(self) -> FoundCheckpoint | None:
        return self.complete[0] if self.complete else None


def _zip_ok(fs: pafs.FileSystem, path: str) -> bool:
    try:
        with fs.open_input_file(path) as handle, zipfile.ZipFile(handle) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def incomplete_reason(folder: RunFolder, workers: int) -> str | None:
    """Why ``folder`` is not a complete checkpoint of a ``workers``-rank run, or None when it is."""
    try:
        progress = json.loads(folder.read_text(MEMEL_STATE, run_record.PROGRESS_FILE))
        int(progress["step"])
        tag = str(progress["tag"])
    except (OSError, ValueError, KeyError, TypeError):
        return "memel/progress.json missing or unreadable"
    shards = {posixpath.basename(info.path): info.path for info in folder.listing(tag)}
    state = {posixpath.basename(info.path): info.path for info in folder.listing(MEMEL_STATE)}
    if not {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"} & shards.keys():
        return f"no DeepSpeed model states for tag {tag}"
    optim = [name for name in shards if name.endswith("optim_states.pt")]
    if optim and len(optim) < workers:
        return f"{len(optim)} of {workers} optimizer shards"
    for rank in range(workers):
        for name in (run_record.loader_file(rank), run_record.rng_file(rank)):
            if name not in state:
                return f"memel/{name} missing"
        try:
            json.loads(folder.read_text(MEMEL_STATE, run_record.loader_file(rank)))
        except (OSError, ValueError):
            return f"memel/{run_record.loader_file(rank)} unreadable"
    for prefix, files in ((tag, shards), (MEMEL_STATE, state)):
        for name, path in sorted(files.items()):
            if name.endswith(".pt") and not _zip_ok(folder.fs, path):
                return f"{prefix}/{name} truncated or unreadable"
    if run_record.INHIBITION_FILE not in state:
        return "memel/inhibition.pt missing"
    return None


def _step(folder: RunFolder) -> int:
    try:
        return int(json.loads(folder.read_text(MEMEL_STATE, run_record.PROGRESS_FILE))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def scan_run(run: RunFolder, workers: int) -> Scan:
    """Every checkpoint in ``run``, newest (highest step, then latest written, then name) first."""
    scan = Scan()
    infos = [
        info
        for info in run.listing()
        if info.type == pafs.FileType.Directory and info.base_name.startswith(CHECKPOINT_PREFIX)
    ]
    folders = [(run.at(info.base_name), info.mtime_ns or 0) for info in infos]
    ordered = sorted(((_step(folder), mtime, folder.path, folder) for folder, mtime in folders), reverse=True)
    for step, _, _, folder in ordered:
        reason = incomplete_reason(folder, workers)
        if reason is None:
            scan.complete.append(FoundCheckpoint(folder, step))
        elif step >= 0 or _holds_files(folder):  # an S3 store may list a deleted folder's empty prefix
            scan.skipped[posixpath.basename(folder.path)] = reason
    return scan


def _holds_files(folder: RunFolder) -> bool:
    selector = pafs.FileSelector(folder.path, recursive=True, allow_not_found=True)
    return any(info.type == pafs.FileType.File for info in folder.fs.get_file_info(selector))


@dataclass
class FinishedOnDisk:
    """A run whose newest complete checkpoint is its last step: the metrics reported with it, in the
    shape of Ray Train's result (``metrics``, ``checkpoint.path``)."""

    metrics: dict[str, Any]
    checkpoint: Any


def finished_on_disk(found: FoundCheckpoint | None, steps: int) -> FinishedOnDisk | None:
    """The run's result when ``found`` holds its final step and the metrics reported with it."""
    if found is None or found.step < steps:
        return None
    try:
        metrics = json.loads(found.folder.read_text(MEMEL_STATE, run_record.REPORT_FILE))
    except (OSError, ValueError):
        return None
    return FinishedOnDisk(metrics=metrics, checkpoint=SimpleNamespace(path=found.path))


def newest_checkpoint(run: RunFolder | None, workers: int, reported: object = None) -> object:
    """What a worker resumes from: the newest complete checkpoint in ``run`` (a ``ray.train.Checkpoint``),
    or ``reported`` (Ray's choice) when ``run`` is None or holds nothing complete."""
    if run is None:
        return reported
    import ray.train

    scan = scan_run(run, workers)
    for name, reason in scan.skipped.items():
        log.warning("checkpoint %s skipped: %s", name, reason)
    if scan.newest is None:
        return reported
    if reported is not None and str(getattr(reported, "path", "")).rstrip("/") == scan.newest.path:
        return reported
    return ray.train.Checkpoint(scan.newest.path, filesystem=run.fs)


def recorded_names(run: RunFolder) -> tuple[list[str], str | None] | None:
    """The checkpoint folders Ray's snapshot lists and its latest one, or None when there is no
    readable snapshot."""
    try:
        state = json.loads(run.read_text(SNAPSHOT_FILE) or "null")
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict):
        return None
    names = [r.get("checkpoint_dir_name") for r in state.get("checkpoint_results") or [] if isinstance(r, dict)]
    latest = state.get("latest_checkpoint_result")
    return [n for n in names if n], latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None


def snapshot_problem(run: RunFolder, newest: FoundCheckpoint | None) -> str | None:
    """Why Ray's snapshot must not be used (unloadable, naming missing folders, or its latest checkpoint
    not ``newest``, the newest complete one), or None when it is fine or absent."""
    if not run.exists(SNAPSHOT_FILE):
        return None
    try:
        empty = run.fs.get_file_info(run.join(SNAPSHOT_FILE)).size == 0
        state = json.loads(run.read_text(SNAPSHOT_FILE) or "null")
    except (OSError, ValueError) as error:
        return f"unreadable ({type(error).__name__})"
    if not isinstance(state, dict):
        return "empty" if empty else "not a JSON object"
    names, latest = recorded_names(run) or ([], None)
    missing = [name for name in names if not run.exists(name)]
    if missing:
        return f"names missing checkpoint folders {missing}"
    if newest is not None and latest != newest.name:
        return f"out of date (its latest: {latest}; the newest complete: {newest.name})"
    return None


def repair_snapshot(run: RunFolder, newest: FoundCheckpoint | None = None) -> str | None:
    """Move aside a Ray snapshot that Ray could not load or that lags behind ``newest``, so the run
    resumes from its checkpoints instead of failing or replaying steps; returns what was done, or
    None when the snapshot is fine or absent."""
    problem = snapshot_problem(run, newest)
    if problem is None:
        return None
    kind = "stale" if problem.startswith("out of date") else "corrupt"
    aside = f"{SNAPSHOT_FILE}.{kind}-{time.strftime('%Y%m%dT%H%M%S')}"
    run.fs.move(run.join(SNAPSHOT_FILE), run.join(aside))
    return f"Ray's checkpoint record {run.join(SNAPSHOT_FILE)} was {problem}; moved it to {aside}"
