"""Training rate of the model ladder's models (forward, backward, AdamW step) on random tokens
(``memel bench throughput``): tokens per second, the median and the best step."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from memel.errors import ConfigError
from memel.models import build, causal_lm_loss, count_parameters, get_config
from memel.models.family_configs import DecoderConfig


@dataclass(frozen=True)
class ThroughputRow:
    """One model's rates; the best step is the one least disturbed by other processes."""

    model: str
    parameters: int
    median_tokens_per_s: float
    best_tokens_per_s: float


def measure(name: str, batch: int, seq: int, steps: int, warmup: int, device: str = "cpu") -> ThroughputRow:
    """Time ``steps`` training steps of decoder ``name`` on random tokens after ``warmup`` untimed ones."""
    config = get_config(name)
    if not isinstance(config, DecoderConfig):
        raise ConfigError(f"--model: {name!r} is not a decoder language model; allowed: a byte-* or pythia-* model")
    if seq > config.context_length:
        raise ConfigError(f"--seq: {seq} exceeds {name}'s context of {config.context_length} tokens")
    torch.manual_seed(0)
    model = build(name).train().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        causal_lm_loss(model(ids), ids).backward()
        optimizer.step()
        if ids.is_cuda:
            torch.cuda.synchronize(ids.device)

    for _ in range(warmup):
        step()
    rates = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        rates.append(batch * seq / (time.perf_counter() - start))
    return ThroughputRow(name, count_parameters(name), statistics.median(rates), max(rates))


def bench_throughput(
    models: list[str], batch: int, seq: int, steps: int, warmup: int, device: str = "cpu"
) -> list[ThroughputRow]:
    """One row per model, in order."""
    for field, value in (("--batch", batch), ("--seq", seq), ("--steps", steps)):
        if value < 1:
            raise ConfigError(f"{field}: got {value}; allowed: an integer >= 1")
    if warmup < 0:
        raise ConfigError(f"--warmup: got {warmup}; allowed: an integer >= 0")
    return [measure(name, batch, seq, steps, warmup, device) for name in models]
