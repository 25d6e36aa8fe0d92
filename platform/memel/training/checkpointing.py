"""A run's checkpoint: DeepSpeed's shards plus memel's own state (Inhibitors, training data
position, RNG, run id) in the checkpoint's ``memel/`` folder (names: :mod:`memel.run_record`).

Every rank saves its own data position and RNG state; rank 0 saves the Inhibitors (identical
on every rank after each sync) and the progress file that restoring starts from. Inhibitors
whose statistics are sharded across ranks (``execution.shard_statistics``) are saved by every
rank, each its own shard, and each rank restores its own. The periodic evaluation's held-out
batches are fixed for a run, so they need no position (one saved in an older checkpoint is ignored).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from memel import run_record


class Checkpointing:
    """Saves and restores one rank's part of a checkpoint."""

    def __init__(
        self,
        engine: Any,
        inserted: dict[str, Any],
        loader: Any,
        rank: int,
        run_id: str | None = None,
    ) -> None:
        self.engine, self.inserted, self.loader, self.rank, self.run_id = engine, inserted, loader, rank, run_id

    def save(self, directory: Path, step: int, tokens_seen: int) -> None:
        tag = run_record.checkpoint_tag(step)
        self.engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step, "tokens_seen": tokens_seen})
        state = run_record.checkpoint_state(directory)
        state.mkdir(parents=True, exist_ok=True)
        sharded = any(m.sharded for m in self.inserted.values())
        if sharded or self.rank == 0:
            inhibitors = {name: m.state_dict() for name, m in self.inserted.items()}
            path = run_record.inhibition_shard_path(directory, self.rank) if sharded else None
            torch.save(inhibitors, path or run_record.inhibition_path(directory))
        if self.rank == 0:
            progress = {"step": step, "tokens_seen": tokens_seen, "run_id": self.run_id, "tag": tag}
            run_record.progress_path(directory).write_text(json.dumps(progress))
        (state / run_record.loader_file(self.rank)).write_text(json.dumps(self.loader.state_dict()))
        torch.save(torch.get_rng_state(), state / run_record.rng_file(self.rank))

    def restore(self, directory: Path) -> dict[str, Any]:
        """Load everything back; returns the progress file (step, tokens_seen, run_id, tag)."""
        state = run_record.checkpoint_state(directory)
        progress = json.loads(run_record.progress_path(directory).read_text())
        self.engine.load_checkpoint(str(directory), tag=progress["tag"])
        shard_file = run_record.inhibition_shard_path(directory, self.rank)
        saved = torch.load(
            shard_file if shard_file.exists() else run_record.inhibition_path(directory), weights_only=False
        )
        for name, module in self.inserted.items():
            module.load_state_dict(saved[name])
        loader_file = state / run_record.loader_file(self.rank)
        if loader_file.exists():
            self.loader.load_state_dict(json.loads(loader_file.read_text()))
        rng_file = state / run_record.rng_file(self.rank)
        if rng_file.exists():
            torch.set_rng_state(torch.load(rng_file, weights_only=False))
        return progress
