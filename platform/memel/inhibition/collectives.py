"""The collectives of the inhibition core: the data-parallel world, one flat all-reduce over
several tensors, and the reduction of snapshot windows. Plain tensors in, nothing else known."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .layout import SUMMED_WINDOW_ROWS, W_MS_MAX


def distributed_world(group: Any = None) -> int | None:
    """World size of ``group`` (None: the default group) when torch.distributed runs with >1 rank in it, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    size = dist.get_world_size(group)
    return size if size > 1 else None


def all_reduce_sum(flat: torch.Tensor, group: Any = None, async_op: bool = False) -> Any:
    """``all_reduce(SUM)`` of one flat tensor in place over ``group``; the work handle with ``async_op``."""
    return dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


def all_reduce_in_place(tensors: Sequence[torch.Tensor], op: Any, group: Any = None) -> None:
    """Reduce several tensors across ranks with ONE collective over a flat copy, written back."""
    if distributed_world(group) is None or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=op, group=group)
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def reduce_windows(windows: Sequence[torch.Tensor], group: Any = None) -> None:
    """Snapshot windows reduced in place across the ranks of ``group``: counters and sums added,
    the max MS maximised; two collectives whatever the number of modules (none in one process)."""
    all_reduce_in_place([w[SUMMED_WINDOW_ROWS] for w in windows], dist.ReduceOp.SUM, group)
    all_reduce_in_place([w[W_MS_MAX] for w in windows], dist.ReduceOp.MAX, group)
