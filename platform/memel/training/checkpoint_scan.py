"""The newest complete checkpoint of a run, found by looking at its storage folder.

Ray Train remembers its checkpoints in ``checkpoint_manager_snapshot.json``, written after a
report is registered; a driver or worker killed in between leaves checkpoints on disk that the
snapshot does not list yet, and a full disk can leave the snapshot empty. Resuming from the
snapshot would then replay steps already logged, or fail. Here the run's folder itself is the
record: every ``checkpoint_*`` folder is checked, and the one with the highest step whose every
file is present and readable wins.

A checkpoint is complete when ``memel/progress.json`` names its step and DeepSpeed tag, the tag's
folder holds the model states, every rank's loader state, RNG state and (ZeRO) optimizer shard is
there, and every ``.pt`` file opens as a zip archive (a truncated file does not: its central
directory, at the end, is missing). Only local storage is scanned; other storage keeps Ray's choice.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from memel import run_record

log = logging.getLogger("memel.training")

#: Ray Train's record of a run's checkpoints (``ray.train.v2._internal.constants``).
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
CHECKPOINT_PREFIX = "checkpoint_"
MEMEL_STATE = run_record.CHECKPOINT_STATE_DIR


@dataclass(frozen=True)
class FoundCheckpoint:
    """A complete checkpoint: its folder and the step it holds."""

    path: Path
    step: int


@dataclass
class Scan:
    """What a run folder holds: the newest complete checkpoint and why others were skipped."""

    newest: FoundCheckpoint | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # folder name -> why it is incomplete


def local_folder(storage: str) -> Path | None:
    """``storage`` as a local path, or None for remote storage (``s3://`` and the like)."""
    if storage.startswith("file://"):
        return Path(storage[len("file://") :])
    return None if "://" in storage else Path(storage)


def _zip_ok(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def incomplete_reason(folder: Path, workers: int) -> str | None:
    """Why ``folder`` is not a complete checkpoint of a ``workers``-rank run, or None when it is."""
    state = folder / MEMEL_STATE
    try:
        progress = json.loads((state / run_record.PROGRESS_FILE).read_text())
        int(progress["step"])
        tag = str(progress["tag"])
    except (OSError, ValueError, KeyError, TypeError):
        return "memel/progress.json missing or unreadable"
    shards = folder / tag
    model_files = [shards / "mp_rank_00_model_states.pt", shards / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    if not any(path.exists() for path in model_files):
        return f"no DeepSpeed model states for tag {tag}"
    optim = sorted(shards.glob("*optim_states.pt"))
    if optim and len(optim) < workers:
        return f"{len(optim)} of {workers} optimizer shards"
    for rank in range(workers):
        for name in (run_record.loader_file(rank), run_record.rng_file(rank)):
            if not (state / name).exists():
                return f"memel/{name} missing"
        try:
            json.loads((state / run_record.loader_file(rank)).read_text())
        except (OSError, ValueError):
            return f"memel/loader-rank{rank}.json unreadable"
    for path in [*shards.glob("*.pt"), *state.glob("*.pt")]:
        if not _zip_ok(path):
            return f"{path.relative_to(folder)} truncated or unreadable"
    if not (state / run_record.INHIBITION_FILE).exists():
        return "memel/inhibition.pt missing"
    return None


def _step(folder: Path) -> int:
    try:
        return int(json.loads(run_record.progress_path(folder).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def scan_run(run_folder: Path, workers: int) -> Scan:
    """Every checkpoint under ``run_folder``, newest (highest step, then latest written) first."""
    scan = Scan()
    if not run_folder.is_dir():
        return scan
    folders = [p for p in run_folder.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    folders.sort(key=lambda p: (_step(p), p.stat().st_mtime, p.name), reverse=True)
    for folder in folders:
        reason = incomplete_reason(folder, workers)
        if reason is None:
            scan.newest = FoundCheckpoint(folder, _step(folder))
            return scan
        scan.skipped[folder.name] = reason
    return scan


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
        metrics = json.loads(run_record.report_path(found.path).read_text())
    except (OSError, ValueError):
        return None
    return FinishedOnDisk(metrics=metrics, checkpoint=SimpleNamespace(path=str(found.path)))


def newest_checkpoint(run_folder: str | None, workers: int, reported: object = None) -> object:
    """What a worker resumes from: the newest complete checkpoint in ``run_folder`` (a
    ``ray.train.Checkpoint``), or ``reported`` (Ray's choice) when the folder is not local or
    holds nothing newer."""
    folder = local_folder(run_folder) if run_folder else None
    if folder is None:
        return reported
    import ray.train

    scan = scan_run(folder, workers)
    for name, reason in scan.skipped.items():
        log.warning("checkpoint %s skipped: %s", name, reason)
    if scan.newest is None:
        return reported
    if reported is not None and Path(getattr(reported, "path", "")).resolve() == scan.newest.path.resolve():
        return reported
    return ray.train.Checkpoint.from_directory(str(scan.newest.path))


def repair_snapshot(run_folder: Path) -> str | None:
    """Move aside a Ray snapshot that Ray could not load (empty, not JSON, or naming a checkpoint
    folder that is gone), so the run resumes from its checkpoints instead of failing; returns
    what was done, or None when the snapshot is fine or absent."""
    snapshot = run_folder / SNAPSHOT_FILE
    if not snapshot.exists():
        return None
    problem = None
    try:
        state = json.loads(snapshot.read_text() or "null")
        if not isinstance(state, dict):
            problem = "empty" if snapshot.stat().st_size == 0 else "not a JSON object"
        else:
            names = [r.get("checkpoint_dir_name") for r in state.get("checkpoint_results", []) if isinstance(r, dict)]
            missing = [n for n in names if n and not (run_folder / n).is_dir()]
            if missing:
                problem = f"names missing checkpoint folders {missing}"
    except (OSError, ValueError) as error:
        problem = f"unreadable ({type(error).__name__})"
    if problem is None:
        return None
    aside = snapshot.with_name(f"{SNAPSHOT_FILE}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    shutil.move(str(snapshot), str(aside))
    return f"Ray's checkpoint record {snapshot} was {problem}; moved it to {aside.name}"
