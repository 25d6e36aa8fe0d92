"""Applying pending statistics: locally, or across the data-parallel group with ONE collective.

Each rank's pending statistics travel as sums (count, sum and sum of squares of deviations
from the shared history mean, and the snapshot counters) in float64, so a single
``all_reduce(SUM)`` over one flat buffer covering every module gives every rank the moments
of the global batch; merging them is then the same deterministic arithmetic on every rank.
With threshold selection each module appends two numbers to its part of that buffer (values
with phi >= tau, values judged), so every rank updates tau from the global fraction, with
the same arithmetic: tau stays identical on all ranks at no extra collective.

Members are anything with the payload API of ``Inhibitor`` (``PayloadMember``): this module
does not import the Inhibitor, which calls ``sync_inhibitors`` itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch

from .collectives import all_reduce_sum, distributed_world


class PayloadMember(Protocol):
    """What sync needs of a module: its pending statistics as one flat float64 payload."""

    process_group: Any

    @property
    def initialized(self) -> bool: ...

    @property
    def has_pending(self) -> bool: ...

    @property
    def sharded(self) -> bool: ...

    @property
    def payload_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def write_payload(self, out: torch.Tensor) -> None: ...

    def apply_payload(self, flat: torch.Tensor) -> None: ...

    def merge_pending(self) -> None: ...

    def attach_reduction(self, reduction: PendingReduction | None) -> None: ...

    def finish_reduction(self) -> None: ...


class PendingReduction:
    """An asynchronous all-reduce of pending statistics; applied at the next use of any member."""

    def __init__(self, members: list[PayloadMember], flat: torch.Tensor, work: Any) -> None:
        self.members = members
        self.flat = flat
        self.work = work

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
        members, self.members = self.members, []
        for member in members:
            member.attach_reduction(None)
        _apply_flat(members, self.flat)


def _apply_flat(members: list[PayloadMember], flat: torch.Tensor) -> None:
    offset = 0
    for member in members:
        size = member.payload_size
        member.apply_payload(flat[offset : offset + size])
        offset += size


def _by_group(members: list[PayloadMember], process_group: Any) -> list[tuple[Any, list[PayloadMember]]]:
    """Members by the process group they reduce over (``process_group`` if given, else each
    member's own), in the order each group first appears (the same on every rank)."""
    groups: list[tuple[Any, list[PayloadMember]]] = []
    for member in members:
        group = process_group if process_group is not None else member.process_group
        for known, grouped in groups:
            if known is group:
                grouped.append(member)
                break
        else:
            groups.append((group, [member]))
    return groups


def sync_inhibitors(
    inhibitors: Iterable[PayloadMember], process_group: Any = None, async_op: bool = False
) -> PendingReduction | None:
    """Merge every module's pending statistics into its history as one batch.

    Distributed: one ``all_reduce`` per process group and device over all modules, so every
    rank ends with the global batch's statistics; each module reduces over its own
    ``process_group`` (set by ``memel.inhibit``; None: the default group) unless
    ``process_group`` is given, which then overrides it for this call. With ``async_op`` it
    returns at once and the result is applied before the next call of any member (or its next
    read). Every rank of a group must call it at the same point, with the same modules.
    Members with sharded statistics (reduced as each call ran) merge without a collective.
    """
    members = [m for m in inhibitors if m.initialized]
    for member in members:
        member.finish_reduction()
    for member in members:  # a sharded member's pending moments are every rank's already
        if member.sharded and member.has_pending:
            member.merge_pending()
    members = [m for m in members if not m.sharded]
    handle = None
    for group, grouped in _by_group(members, process_group):
        if distributed_world(group) is None:
            for member in grouped:
                if member.has_pending:
                    member.merge_pending()
            continue
        by_device: dict[torch.device, list[PayloadMember]] = {}
        for member in grouped:
            by_device.setdefault(member.device, []).append(member)
        for device, device_members in by_device.items():
            flat = torch.empty(sum(m.payload_size for m in device_members), dtype=torch.float64, device=device)
            offset = 0
            for member in device_members:
                member.write_payload(flat[offset : offset + member.payload_size])
                offset += member.payload_size
            work = all_reduce_sum(flat, group, async_op)
            if async_op:
                handle = PendingReduction(device_members, flat, work)
                for member in device_members:
                    member.attach_reduction(handle)
            else:
                _apply_flat(device_members, flat)
    return handle


class InhibitorGroup:
    """The modules inserted by one ``memel.inhibit`` call; flushed together (one collective)."""

    def __init__(self, members: list[Any]) -> None:
        self.members = members
        for member in members:
            member.sync_group = self

    def flush(self) -> None:
        sync_inhibitors(self.members)
