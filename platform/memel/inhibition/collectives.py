"""The collectives of the inhibition core: the data-parallel world, one flat all-reduce over
several tensors, the reduction of snapshot windows, and the reduce-scatter / all-gather of
neuron rows that sharded statistics use. Plain tensors in, nothing else known."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .layout import SUMMED_WINDOW_ROWS, W_MS_MAX

#: The flat-tensor forms of reduce-scatter and all-gather (renamed ``*_single`` in newer torch).
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


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


def reduce_scatter_rows(rows: torch.Tensor, extras: torch.Tensor, padded: int, op: Any, group: Any = None) -> tuple:
    """Reduce ``rows`` ([k, N], N <= W x ``padded``) across the ranks of ``group`` and keep this
    rank's ``padded`` columns of the result, with ``extras`` ([e] numbers every rank needs)
    reduced in the same collective: one ``reduce_scatter_tensor`` whose chunk r holds columns
    [r x padded, (r+1) x padded) of every row, then the extras. Returns ([k, padded], [e])."""
    world = dist.get_world_size(group)
    k, neurons = rows.shape
    chunks = torch.zeros(world, k * padded + extras.numel(), dtype=rows.dtype, device=rows.device)
    for rank in range(world):  # (copied chunk by chunk: no second copy of the rows)
        start, stop = rank * padded, min((rank + 1) * padded, neurons)
        if stop > start:
            chunks[rank, : k * padded].view(k, padded)[:, : stop - start] = rows[:, start:stop]
    chunks[:, k * padded :] = extras
    out = torch.empty(k * padded + extras.numel(), dtype=rows.dtype, device=rows.device)
    _REDUCE_SCATTER(out, chunks.view(-1), op=op, group=group)
    return out[: k * padded].view(k, padded), out[k * padded :]


def all_gather_rows(shard: torch.Tensor, neurons: int, group: Any = None) -> torch.Tensor:
    """Every rank's ``shard`` ([k, padded], its columns of a [k, N] tensor, padded alike on
    every rank) put together in rank order: the [k, N] tensor, on every rank of ``group``."""
    world = dist.get_world_size(group)
    k, padded = shard.shape
    gathered = torch.empty(world * k * padded, dtype=shard.dtype, device=shard.device)
    _ALL_GATHER(gathered, shard.reshape(-1).contiguous(), group=group)
    return gathered.view(world, k, padded).permute(1, 0, 2).reshape(k, world * padded)[:, :neurons]
