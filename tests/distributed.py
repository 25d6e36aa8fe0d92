"""Run a function in several CPU processes joined by a gloo process group (multi-rank tests)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from memel.process_exit import exit_after_collectives
from memel.services.ports import free_ports


def _entry(rank: int, world_size: int, port: int, func: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        func(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
    exit_after_collectives()  # an interpreter shutdown could abort this finished rank (see there)


def run_distributed(func: Callable[..., Any], world_size: int = 2, *args: Any) -> None:
    """Call ``func(rank, world_size, *args)`` in ``world_size`` spawned processes; results
    travel back through files the function writes (e.g. into a tmp_path passed in args)."""
    mp.spawn(_entry, args=(world_size, free_ports("127.0.0.1", 1)[0], func, args), nprocs=world_size, join=True)


@contextlib.contextmanager
def counting_all_reduce() -> Iterator[dict[str, int]]:
    """Count this process's ``dist.all_reduce`` calls while the block runs: ``{"all_reduce": n}``."""
    calls = {"all_reduce": 0}
    original = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls["all_reduce"] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        yield calls
    finally:
        dist.all_reduce = original
