"""Applying pending statistics: locally, or across the data-parallel group with ONE collective.

Each rank's pending statistics travel as sums (count, sum and sum of squares of deviations
from the shared history mean, and the snapshot counters) in float64, so a single
``all_reduce(SUM)`` over one flat buffer covering every module gives every rank the moments
of the global batch; merging them is then the same deterministic arithmetic on every rank.
With threshold selection each module appends two numbers to its part of that buffer (values
with phi >= tau, values judged), so every rank updates tau from the global fraction, with
the same arithmetic: tau stays identical on all ranks at no extra collective.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .module import Inhibitor


def distributed_world(group: Any = None) -> int | None:
    """World size of the data-parallel group when torch.distributed runs with >1 rank, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    size = dist.get_world_size(group)
    return size if size > 1 else None


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
    """Snapshot windows reduced in place across ranks: counters and sums added, the max MS
    maximised; two collectives whatever the number of modules (none in one process)."""
    from .module import SUMMED_WINDOW_ROWS, W_MS_MAX

    all_reduce_in_place([w[SUMMED_WINDOW_ROWS] for w in windows], dist.ReduceOp.SUM, group)
    all_reduce_in_place([w[W_MS_MAX] for w in windows], dist.ReduceOp.MAX, group)


class PendingReduction:
    """An asynchronous all-reduce of pending statistics; applied at the next use of any member."""

    def __init__(self, members: list[Inhibitor], flat: torch.Tensor, work: Any) -> None:
        self.members = members
        self.flat = flat
        self.work = work

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
        members, self.members = self.members, []
        for member in members:
            member._inflight = None
        _apply_flat(members, self.flat)


def _apply_flat(members: list[Inhibitor], flat: torch.Tensor) -> None:
    offset = 0
    for member in members:
        size = member.payload_size
        member._apply_payload(flat[offset : offset + size])
        offset += size


def sync_inhibitors(inhibitors: Iterable[Inhibitor], group: Any = None, async_op: bool = False) -> PendingReduction | None:
    """Merge every module's pending statistics into its history as one batch.

    Distributed: one ``all_reduce`` per device over all modules, so every rank ends with the
    global batch's statistics; with ``async_op`` it returns at once and the result is applied
    before the next call of any member (or its next read). Every rank must call it at the
    same point, with the same modules.
    """
    members = [m for m in inhibitors if m.initialized]
    for member in members:
        member._finish_inflight()
    if not members:
        return None
    if distributed_world(group) is None:
        for member in members:
            if member._has_pending:
                member._apply_payload(member._sync_payload())  # read in full before pending is cleared
        return None
    by_device: dict[torch.device, list[Inhibitor]] = {}
    for member in members:
        by_device.setdefault(member.mean.device, []).append(member)
    handle = None
    for device_members in by_device.values():
        flat = torch.cat([m._sync_payload().reshape(-1) for m in device_members])
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=async_op)
        if async_op:
            handle = PendingReduction(device_members, flat, work)
            for member in device_members:
                member._inflight = handle
        else:
            _apply_flat(device_members, flat)
    return handle


class InhibitorGroup:
    """The modules inserted by one ``memel.inhibit`` call; flushed together (one collective)."""

    def __init__(self, members: list[Inhibitor], group: Any = None) -> None:
        self.members = members
        self.process_group = group
        for member in members:
            member._group = self

    def flush(self) -> None:
        sync_inhibitors(self.members, self.process_group)
