"""A plain torchrun + DistributedDataParallel loop over a memel spec's model and data.

The baseline for ``memel bench ddp``: no Ray, no DeepSpeed, no tracking; the same model,
inhibition, data shards, batch sizes, optimizer, gradient clipping and torch threads; gradients
are all-reduced once per optimizer step (``no_sync`` for the other micro-batches). Rank 0
writes each step's wall time (from the end of the previous step) as memel's step timer does.
Run under torchrun:
``python -m torch.distributed.run --standalone --nproc_per_node 2 -m memel.benchmarks.ddp_loop SPEC.json OUT.json``
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import memel
from memel.data import build as build_loader
from memel.models import build as build_model
from memel.training.callbacks.timing import step_times
from memel.training.objective import compute
from memel.training.spec import TrainSpec
from memel.training.worker import insert_inhibition


def main(spec_file: str, out_file: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = TrainSpec(**json.loads(Path(spec_file).read_text()))
    torch.set_num_threads(spec.train.threads_per_worker)
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model.name, **spec.model.overrides)
    insert_inhibition(model, spec)
    ddp = DistributedDataParallel(model, broadcast_buffers=False)  # memel reduces its own buffers
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    loader = build_loader(
        {**spec.data, "batch_size": spec.train.micro_batch_size, "seed": spec.train.seed}, rank, world
    )
    kind = spec.data.get("kind", "text_lm")
    ends = []
    for step in range(1, spec.train.steps + 1):
        for micro in range(spec.train.accumulation):
            # gradients are all-reduced once a step, in the last micro-batch's backward
            with contextlib.nullcontext() if micro == spec.train.accumulation - 1 else ddp.no_sync():
                out = compute(ddp, next(loader), kind, torch.device("cpu"))
                (out.loss / spec.train.accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        memel.sync(model)
        ends.append((step, time.perf_counter()))
    if rank == 0:
        Path(out_file).write_text(json.dumps(step_times(ends)))
    dist.barrier()  # no rank tears gloo down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
