"""The learning-rate schedule of a training run: linear warmup, then constant or cosine decay.

``lr_factor`` is the multiplier of ``train.lr`` before optimizer step ``step`` (0-based), and
``build_scheduler`` wraps it in a torch ``LambdaLR`` that DeepSpeed steps once per optimizer step
and saves with its checkpoints, so a resumed run continues the same curve.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from .spec import TrainSection

LrSchedule = Literal["constant", "cosine"]


def lr_factor(step: int, *, warmup: int, total: int, schedule: LrSchedule, min_ratio: float) -> float:
    """``train.lr`` times this is the lr of optimizer step ``step`` (0-based) of ``total``.

    Warmup rises linearly to 1 over the first ``warmup`` steps. ``cosine`` then falls along half a
    cosine from 1 at step ``warmup`` to ``min_ratio`` at the last step, ``total - 1``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = total - 1 - warmup
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection) -> torch.optim.lr_scheduler.LambdaLR | None:
    """The run's schedule as a ``LambdaLR``; None for a constant lr without warmup."""
    if train.lr_schedule == "constant" and not train.warmup_steps:
        return None
    import torch

    factor = partial(
        lr_factor,
        warmup=train.warmup_steps,
        total=train.steps,
        schedule=train.lr_schedule,
        min_ratio=train.min_lr_ratio,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
