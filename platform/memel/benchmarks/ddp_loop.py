"""A plain torchrun training loop over a memel spec's model and data: DistributedDataParallel, or
the DeepSpeed engine memel's workers build, without Ray or tracking.

The baselines for ``memel bench ddp``: the same model, inhibition, data shards, batch sizes,
optimizer, gradient clipping and torch threads. ``ddp``: gradients are all-reduced once per
optimizer step (``no_sync`` for the other micro-batches). ``deepspeed``: ``deepspeed.initialize``
with the run's own DeepSpeed config (ZeRO stage included), stepped per micro-batch as memel's
loop does, so the difference from ``memel train`` is what memel and Ray add. Rank 0 writes
each step's wall time (from the end of the previous step) as memel's step timer does.
Run under torchrun:
``python -m torch.distributed.run --standalone --nproc_per_node 2 -m memel.benchmarks.ddp_loop SPEC.json OUT.json [ddp|deepspeed]``
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import memel
from memel.data import build as build_loader
from memel.models import build as build_model
from memel.process_exit import exit_after_collectives
from memel.training.callbacks.timing import step_times
from memel.training.deepspeed_config import deepspeed_config
from memel.training.objective import compute
from memel.training.spec import TrainSpec
from memel.training.worker import insert_inhibition

#: The loops this module runs.
ENGINES = ("ddp", "deepspeed")


def main(spec_file: str, out_file: str, engine: str = "ddp") -> None:
    """Train ``spec_file``'s spec with ``engine`` on this torchrun rank; rank 0 writes the step times."""
    if engine not in ENGINES:
        raise SystemExit(f"error: engine: got {engine!r}; use one of {', '.join(ENGINES)}")
    spec = TrainSpec(**json.loads(Path(spec_file).read_text()))
    if engine == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(spec.train.threads_per_worker)
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model.name, **spec.model.overrides)
    insert_inhibition(model, spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    loader = build_loader(
        {**spec.data, "batch_size": spec.train.micro_batch_size, "seed": spec.train.seed}, rank, world
    )
    step = _deepspeed_step if engine == "deepspeed" else _ddp_step
    state = _deepspeed_engine(model, optimizer, spec) if engine == "deepspeed" else _ddp_model(model, optimizer)
    kind = spec.data.get("kind", "text_lm")
    ends = []
    for number in range(1, spec.train.steps + 1):
        step(state, loader, kind, spec)
        memel.sync(model)
        ends.append((number, time.perf_counter()))
    if rank == 0:
        Path(out_file).write_text(json.dumps(step_times(ends)))
    dist.barrier()  # no rank tears gloo down while another still uses it
    dist.destroy_process_group()


def _ddp_model(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Any, ...]:
    return DistributedDataParallel(model, broadcast_buffers=False), model, optimizer  # memel reduces its own buffers


def _ddp_step(state: tuple[Any, ...], loader: Iterator[Any], kind: str, spec: TrainSpec) -> None:
    ddp, model, optimizer = state
    for micro in range(spec.train.accumulation):
        # gradients are all-reduced once a step, in the last micro-batch's backward
        with contextlib.nullcontext() if micro == spec.train.accumulation - 1 else ddp.no_sync():
            out = compute(ddp, next(loader), kind, torch.device("cpu"))
            (out.loss / spec.train.accumulation).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _deepspeed_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, spec: TrainSpec) -> Any:
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(spec))
    return engine


def _deepspeed_step(engine: Any, loader: Iterator[Any], kind: str, spec: TrainSpec) -> None:
    for _ in range(spec.train.accumulation):  # DeepSpeed scales the loss and steps at the boundary
        out = compute(engine, next(loader), kind, torch.device("cpu"))
        engine.backward(out.loss)
        engine.step()


if __name__ == "__main__":
    main(*sys.argv[1:4])
    exit_after_collectives()
