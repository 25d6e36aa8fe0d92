"""One-process DeepSpeed training with inhibition, without Ray: the GPU check's training run.

The same pieces as a ``memel train`` worker (the spec, ``insert_inhibition``, the DeepSpeed
config from ``deepspeed_config``, the data loader, ``compute`` and ``memel.sync`` after each
optimizer step) in a 1-process group set up from the environment (MASTER_ADDR/PORT, RANK=0,
WORLD_SIZE=1), so that it runs where Ray is not installed. It is not the Ray Train path.

Data: the Python standard library's source as bytes (``stdlib-code``, offline everywhere).

Usage (GPU):  python benchmarks/gpu_deepspeed.py --model pythia-70m --steps 300 --out result.json
Usage (CPU):  python benchmarks/gpu_deepspeed.py --device cpu --precision fp32 --model byte-0.2m --steps 5
Prints one JSON line; exits 1 if the loss is not finite or did not fall, or a statistic is not finite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch


def _one_process_group(device: torch.device) -> None:
    from memel.services.ports import free_ports

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_ports("127.0.0.1", 1)[0]))
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ[key] = value
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else torch.cuda.current_device())


def run(args: argparse.Namespace) -> dict[str, object]:
    import deepspeed

    import memel
    from memel.data import build as build_loader
    from memel.models import build as build_model
    from memel.training import load_spec
    from memel.training.deepspeed_config import deepspeed_config
    from memel.training.objective import compute
    from memel.training.worker import insert_inhibition

    device = torch.device(args.device)
    spec = load_spec(
        None,
        name="gpu-check",
        model={"name": args.model, "preset": "mlp"},
        data={"kind": "text_lm", "corpus": "stdlib-code", "seq_len": args.seq},
        inhibition={"mode": "rd", "top_n": 1, "forget_steps": 10, "late_start": 10},
        train={
            "steps": args.steps,
            "global_batch_size": args.batch,
            "micro_batch_size": args.batch,
            "workers": 1,
            "zero_stage": args.zero,
            "lr": args.lr,
            "warmup_steps": 0,
            "precision": args.precision,
            "use_gpu": device.type == "cuda",
        },
    )
    _one_process_group(device)
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model.name)
    inserted = insert_inhibition(model, spec)
    loader = build_loader({**spec.data, "batch_size": spec.train.micro_batch_size, "seed": spec.train.seed}, 0, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(spec))

    losses: list[float] = []
    step_times: list[float] = []
    tokens = 0
    for _ in range(spec.train.steps):
        start = time.perf_counter()
        batch = next(loader)
        out = compute(engine, batch, "text_lm", device)
        engine.backward(out.loss + memel.auxiliary_loss(engine.module))
        engine.step()
        memel.sync(engine.module)
        losses.append(float(out.loss.detach()))  # a host sync per step, as in the worker
        step_times.append(time.perf_counter() - start)
        tokens += out.items
    timed = step_times[max(1, len(step_times) // 10) :] or step_times  # the first tenth warms up
    snaps = memel.snapshot(engine.module)
    stats_finite = all(bool(torch.isfinite(s.mean).all() and torch.isfinite(s.var).all()) for s in snaps.values())
    inhibited = sum(int(s.inhibited_count.sum()) for s in snaps.values())
    tail = losses[-min(10, len(losses)) :]
    result: dict[str, object] = {
        "model": spec.model.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": spec.train.precision,
        "zero_stage": spec.train.zero_stage,
        "steps": len(losses),
        "batch": args.batch,
        "seq_len": args.seq,
        "steps_per_s": 1.0 / statistics.median(timed),
        "tokens_per_s": args.batch * args.seq / statistics.median(timed),
        "first_loss": losses[0],
        "final_loss": statistics.fmean(tail),
        "inhibitors": len(inserted),
        "inhibited_values": inhibited,
        "stats_dtype": str(next(iter(inserted.values())).mean.dtype) if inserted else None,
        "stats_finite": stats_finite,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "ray": False,
    }
    result["ok"] = bool(
        all(math.isfinite(x) for x in losses)
        and result["final_loss"] < result["first_loss"]
        and stats_finite
        and inhibited > 0
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pythia-70m")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (one micro-batch)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--zero", type=int, default=2)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"error: device: got {args.device!r}, but torch sees no CUDA GPU here; use --device cpu --precision fp32",
            file=sys.stderr,
        )
        return 2
    result = run(args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "w") as file:
            file.write(line + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
