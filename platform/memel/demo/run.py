"""Train the same small byte-level LM once per inhibition mode and compare the runs.

Every run starts from the same weights and sees the same batches (same seeds); only the
inhibition mode differs, so the table isolates what inhibition does. Each run is the same
:class:`~memel.training.trainer.Trainer` loop as a Ray worker's, on a plain torch optimizer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import memel
from memel.data import TextLMConfig
from memel.models import build, preset_targets
from memel.training.callbacks import Callback
from memel.training.engine import TorchEngine
from memel.training.trainer import Schedule, Trainer


@dataclass
class DemoResult:
    mode: str
    train_loss: float
    heldout_loss: float
    inhibited: int
    mean_ms: float
    max_ms: float
    frac_above: float
    seconds: float


def _heldout_loss(model: torch.nn.Module, batches: list) -> float:
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(b.inputs).flatten(0, 1), b.targets.flatten()).item() for b in batches]
    model.train()
    return sum(losses) / len(losses)


class _StepLosses(Callback):
    """Every step's training loss (logged each step), kept for the last ``keep`` and passed on."""

    def __init__(self, mode: str, on_step: Callable[[str, int, float], None] | None, keep: int = 20) -> None:
        self.mode, self.on_step, self.keep = mode, on_step, keep
        self.recent: list[float] = []

    def on_log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.recent = (self.recent + [metrics["train/loss"]])[-self.keep :]
        if self.on_step is not None:
            self.on_step(self.mode, step - 1, self.recent[-1])


def run_demo(
    model_name: str = "byte-0.2m",
    modes: Iterable[str] = ("original", "rd"),
    steps: int = 300,
    batch_size: int = 16,
    seq_len: int = 64,
    preset: str = "mlp",
    strength: float = 1.0,
    top_n: int = 1,
    lr: float = 3e-3,
    seed: int = 0,
    on_step: Callable[[str, int, float], None] | None = None,
) -> list[DemoResult]:
    """One run per mode; returns a row per mode (final train loss is the mean of the last 20 steps)."""
    heldout = TextLMConfig(corpus="shakespeare", seq_len=seq_len, batch_size=batch_size, split="heldout", seed=seed)
    heldout_batches = [batch for _, batch in zip(range(8), heldout.build())]
    results = []
    for mode in modes:
        torch.manual_seed(seed)
        model = build(model_name)
        config = memel.InhibitionConfig(mode=mode, strength=strength if mode == "rd" else 1.0, top_n=top_n)
        inserted = memel.inhibit(model, preset_targets(model_name, preset), config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        loader = TextLMConfig(corpus="shakespeare", seq_len=seq_len, batch_size=batch_size, seed=seed).build()
        losses = _StepLosses(mode, on_step)
        start = time.perf_counter()
        # statistics merge at each call (stats_update "call"), so the loop does not sync them per step
        trainer = Trainer(
            TorchEngine(model, optimizer),
            loader,
            "text_lm",
            Schedule(steps=steps),
            callbacks=[losses],
            sync_statistics=False,
        )
        trainer.fit()
        seconds = time.perf_counter() - start
        snaps = [m.snapshot() for m in inserted.values()]
        ms_n = sum(int(s.count.numel()) for s in snaps)
        results.append(
            DemoResult(
                mode=mode,
                train_loss=sum(losses.recent) / max(len(losses.recent), 1),
                heldout_loss=_heldout_loss(model, heldout_batches),
                inhibited=sum(int(s.inhibited_count.sum()) for s in snaps),
                mean_ms=sum(float(s.mean_ms.sum()) for s in snaps) / max(ms_n, 1),
                max_ms=max((float(s.max_ms.max()) for s in snaps), default=math.nan),
                frac_above=sum(float(s.frac_above.sum()) for s in snaps) / max(ms_n, 1),
                seconds=seconds,
            )
        )
    return results
