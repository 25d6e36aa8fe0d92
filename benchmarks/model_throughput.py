"""CPU training rate of the byte-vocabulary decoder rungs (forward + backward + AdamW step).

Usage: python benchmarks/model_throughput.py [--models byte-1m byte-4m] [--batch 16] [--seq 256]
       [--steps 10] [--warmup 3] [--threads 2]
Prints tokens/s (batch * seq per optimizer step) for each model: the median and the best step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from memel.models import build, causal_lm_loss, count_parameters


def measure(name: str, batch: int, seq: int, steps: int, warmup: int) -> tuple[float, float]:
    """Median and best tokens per second of single training steps of ``name`` on random bytes.

    The best step is the least disturbed by other processes on a shared machine.
    """
    torch.manual_seed(0)
    model = build(name).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        causal_lm_loss(model(ids), ids).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    rates = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        rates.append(batch * seq / (time.perf_counter() - start))
    return statistics.median(rates), max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["byte-1m", "byte-4m"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x seq {args.seq}, {args.steps} steps")
    for name in args.models:
        median, best = measure(name, args.batch, args.seq, args.steps, args.warmup)
        print(f"{name:>10}  {count_parameters(name):>10,} params  {median:>8,.0f} tokens/s (median step)  {best:>8,.0f} (best step)")


if __name__ == "__main__":
    main()
