"""``checkpoint.keep`` for the checkpoints Ray Train does not track.

Ray deletes the checkpoints in its own record beyond ``keep``; checkpoints written before its
record was set aside (a resumed run, :mod:`memel.training.checkpoint_scan`) are not in it and
would stay forever. The driver lists those when the run starts (``unrecorded``) and prunes them
then; rank 0 prunes them again after every checkpoint, once every rank has reported it (each
rank uploads its own files, so before that barrier the newest checkpoint can look incomplete
and nothing older would be pruned). A checkpoint is deleted only
when it is one of ``unrecorded`` and not among the ``keep`` newest complete checkpoints of the
folder, so the newest one, and the one a run resumes from, always stay; Ray's own checkpoints are
never touched (the two never delete the same folder). Local and S3 storage alike.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from .callbacks.base import Callback
from .checkpoint_scan import RunFolder, Scan, recorded_names, scan_run

log = logging.getLogger("memel.training")


def unrecorded(run: RunFolder, scan: Scan) -> list[str]:
    """The complete checkpoints in ``scan`` that Ray's snapshot does not list (all when it has none)."""
    recorded = set((recorded_names(run) or ([], None))[0])
    return [found.name for found in scan.complete if found.name not in recorded]


def prune(run: RunFolder, scan: Scan, keep: int, candidates: Collection[str]) -> list[str]:
    """Delete the ``candidates`` that are not among the ``keep`` newest complete checkpoints in ``scan``;
    returns the names deleted. A folder that cannot be deleted is left with a warning."""
    kept = {found.name for found in scan.complete[:keep]}
    deleted = []
    for found in scan.complete[keep:]:
        if found.name not in candidates or found.name in kept:
            continue
        try:
            run.fs.delete_dir(found.path)
        except FileNotFoundError:
            continue
        except OSError as error:
            log.warning("checkpoint %s could not be deleted: %s", found.name, error)
            continue
        deleted.append(found.name)
    return deleted


class PruneUnrecorded(Callback):
    """Every rank, after each reported checkpoint: wait until all ranks have reported (uploaded) it;
    then rank 0 deletes the ``unrecorded`` checkpoints beyond ``keep``."""

    def __init__(self, run: RunFolder, workers: int, keep: int, candidates: Collection[str], rank: int = 0) -> None:
        self.run, self.workers, self.keep, self.rank = run, workers, keep, rank
        self.candidates = set(candidates)

    def on_checkpoint(self, step: int, directory: Path, metrics: Mapping[str, Any]) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # every rank's files of this checkpoint are in storage
        if self.rank != 0 or not self.candidates:
            return
        try:
            deleted = prune(self.run, scan_run(self.run, self.workers), self.keep, self.candidates)
        except (OSError, pa.ArrowException) as error:  # never fail a run over housekeeping
            log.warning("old checkpoints not pruned: %s", error)
            return
        self.candidates.difference_update(deleted)
        for name in deleted:
            print(f"[memel] deleted checkpoint {name} (checkpoint.keep={self.keep})", flush=True)
