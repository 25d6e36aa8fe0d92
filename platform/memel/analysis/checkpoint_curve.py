"""A member's held-out loss over training, on one fixed held-out sample, from its retained checkpoints.

The periodic ``eval/loss`` of a run reads the next ``eval.batches`` batches of the held-out set
in file order, so each evaluation sees other files (on the ``mixed`` corpus: now Python, now
Shakespeare) and its value moves with the files as much as with training. Here every retained
checkpoint of a member (``checkpoint.keep`` of them, beside the last one) is scored on the
same ``batches`` held-out batches, spread evenly over the whole held-out set, so the curve
moves only with training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memel import run_record

from .source import Member, read_spec


def retained_checkpoints(last: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every checkpoint beside ``last`` (``last`` included), by step."""
    found = []
    for folder in last.parent.iterdir():
        progress = run_record.progress_path(folder)
        if folder.is_dir() and progress.is_file():
            found.append((int(json.loads(progress.read_text())["step"]), folder))
    return sorted(found)


def spread_batches(data: dict[str, Any], batch_size: int, batches: int, seed: int = 0) -> list[Any]:
    """Up to ``batches`` held-out batches of ``batch_size`` samples spread evenly over the held-out set."""
    from .heldout import heldout_loader

    loader = heldout_loader(data, batch_size, seed)
    order = np.asarray(loader.indices(0))
    picked = order[np.unique(np.linspace(0, len(order) - 1, min(len(order), batches * batch_size)).round().astype(int))]
    return [loader.fetch(picked[s : s + batch_size]) for s in range(0, len(picked) - batch_size + 1, batch_size)]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[Any], kind: str) -> float:
    """The training objective's mean loss over ``batches`` (summed in float64)."""
    from .heldout import sample_losses

    total, items = 0.0, 0.0
    for batch in batches:
        losses, counts = sample_losses(model, batch, kind)
        total, items = total + float(losses.sum()), items + float(counts.sum())
    return total / items


def checkpoint_losses(
    member: Member, batches: int = 16, batch_size: int | None = None
) -> tuple[list[int], list[float]]:
    """Steps and held-out losses of every retained checkpoint of ``member`` on one fixed held-out sample."""
    from memel.models import build
    from memel.training.checkpoint_weights import load_host_weights

    if member.spec is None or not member.checkpoint or not Path(member.checkpoint).is_dir():
        return [], []
    spec = read_spec(member.spec)
    kind = spec.data.get("kind", "text_lm")
    sample = spread_batches(spec.data, batch_size or spec.train.micro_batch_size, batches)
    model = build(spec.model.name, **spec.model.overrides)
    steps, losses = [], []
    for step, folder in retained_checkpoints(Path(member.checkpoint)):
        load_host_weights(
            model, folder, f"member {member.label}: checkpoint {folder.name} does not fit {spec.model.name}"
        )
        model.eval()
        steps.append(step)
        losses.append(mean_loss(model, sample, kind))
    return steps, losses
