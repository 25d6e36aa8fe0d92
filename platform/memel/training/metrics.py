"""Metric reduction across data-parallel ranks, in one place.

Each value carries how it combines over ranks (``sum``, ``mean`` or ``max``). Every rank must
call :func:`reduce_metrics` at the same point with the same names and reduce types; it costs
one ``all_reduce`` for the sums and means together, and one more only when a value is a max.
Outside a distributed run (or with one rank) values come back as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.distributed as dist

Reduce = Literal["sum", "mean", "max"]


def distributed_world() -> int:
    """The number of ranks in the default process group (1 outside a distributed run)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def reduce_metrics(values: Mapping[str, tuple[float, Reduce]], device: torch.device | None = None) -> dict[str, float]:
    """``{name: (value, reduce)}`` reduced over every rank: ``{name: reduced value}``."""
    world = distributed_world()
    if world == 1:
        return {name: float(value) for name, (value, _) in values.items()}
    device = device or torch.device("cpu")
    reduced: dict[str, float] = {}
    for op, kinds in ((dist.ReduceOp.SUM, ("sum", "mean")), (dist.ReduceOp.MAX, ("max",))):
        names = [name for name, (_, reduce) in values.items() if reduce in kinds]
        if not names:
            continue
        tensor = torch.tensor([float(values[name][0]) for name in names], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=op)
        for name, total in zip(names, tensor.tolist()):
            reduced[name] = total / world if values[name][1] == "mean" else total
    return {name: reduced[name] for name in values}
