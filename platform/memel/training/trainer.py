"""The training loop: step, log, evaluate, snapshot, checkpoint; everything else is a callback.

One :class:`Trainer` runs every training in memel: each Ray Train worker (a DeepSpeed engine)
and ``memel demo`` (a :class:`~memel.training.engine.TorchEngine`). Per optimizer step it runs
``accumulation`` micro-batches (task loss plus the l2e inhibition loss), syncs the Inhibitors'
statistics, then, when due by the :class:`Schedule`, logs the training window, evaluates,
takes per-neuron snapshots and checkpoints. Cross-rank numbers are reduced in
:mod:`memel.training.metrics`; every rank runs the same collectives in the same order.
Callbacks (tracking, statistics, pruning, progress, fault injection) see the results; a
stop request from :meth:`Callback.on_eval` on any rank stops every rank after that step.
A training loss that is not finite on any rank (it reaches every rank through the window's
reduction) raises :class:`NonFiniteLossError` on every rank at the same log step.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

import memel
from memel.errors import NonFiniteLossError

from .callbacks import Callback, CallbackList
from .engine import Engine
from .metrics import distributed_world, reduce_metrics
from .objective import compute


@dataclass(frozen=True)
class Schedule:
    """When the loop does what, in optimizer steps (``None``: never); the last step does all that is set."""

    steps: int
    accumulation: int = 1
    log_every: int = 1
    eval_every: int | None = None
    stats_every: int | None = None
    checkpoint_every: int | None = None
    #: the held-out score before the first step (``init/`` metrics) and after the last (``heldout/``)
    evaluate_initial: bool = False
    evaluate_final: bool = False

    def due(self, every: int | None, step: int) -> bool:
        return every is not None and (step % every == 0 or step == self.steps)


class Evaluator(Protocol):
    """Held-out evaluations the loop runs (every rank, at the same steps)."""

    def periodic(self, engine: Any) -> dict[str, float]: ...

    def final(self, engine: Any, prefix: str) -> dict[str, float]: ...


class Checkpointer(Protocol):
    def save(self, directory: Path, step: int, tokens_seen: int) -> None: ...


@dataclass
class TrainState:
    """Where the loop is; ``metrics`` are the latest (reset at each log, as reports carry them)."""

    step: int = 0
    tokens_seen: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    initial: dict[str, float] = field(default_factory=dict)
    stopped: bool = False

    def report(self) -> dict[str, Any]:
        """What a checkpoint is reported with: the initial score, the latest metrics, the position."""
        return {**self.initial, **self.metrics, "step": self.step, "tokens_seen": self.tokens_seen}


@dataclass
class _Window:
    """Training loss and throughput since the last log, on this rank.

    The loss sum stays a float64 tensor on the loss's device until the log step reads it, so
    the steps between logs never wait for the device; float64 makes the sum the same number
    as adding each micro-batch's loss as a Python float.
    """

    loss_sum: torch.Tensor | float = 0.0
    items: float = 0.0
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, items: int) -> None:
        self.loss_sum = self.loss_sum + loss.detach().double() * items
        self.items += items

    def reset(self) -> None:
        self.loss_sum = self.items = 0.0
        self.steps, self.started = 0, time.perf_counter()


def snapshot_summary(snapshots: dict[str, memel.Snapshot]) -> dict[str, float]:
    """Run-level MS summaries over every inserted module (what a sweep's table shows)."""
    if not snapshots:
        return {}
    values = list(snapshots.values())
    return {
        "ms/mean": float(sum(float(s.mean_ms.mean()) for s in values) / len(values)),
        "ms/max": max(float(s.max_ms.max()) for s in values),
        "ms/frac_above": float(sum(float(s.frac_above.mean()) for s in values) / len(values)),
        "inhibited/total": float(sum(float(s.inhibited_count.sum()) for s in values)),
    }


def rank_divergence(inserted: dict[str, memel.Inhibitor], device: torch.device) -> float:
    """Largest difference between ranks of any neuron's mean, var or count (0: all ranks agree).
    Sharded statistics hold each neuron on one rank only: they cannot diverge and are skipped."""
    if distributed_world() == 1:
        return 0.0
    replicated = [m for m in inserted.values() if m.initialized and not m.sharded]
    parts = [torch.cat([m.mean.double(), m.var.double(), m.count.double()]) for m in replicated]
    if not parts:
        return 0.0
    high = torch.cat(parts).to(device)
    low = high.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float((high - low).max())


class Trainer:
    """Trains ``engine`` on ``loader`` (an iterator of batches) by ``schedule``."""

    def __init__(
        self,
        engine: Engine,
        loader: Iterator[Any],
        kind: str,
        schedule: Schedule,
        *,
        callbacks: Iterable[Callback] = (),
        evaluator: Evaluator | None = None,
        checkpointer: Checkpointer | None = None,
        inserted: dict[str, memel.Inhibitor] | None = None,
        device: torch.device | None = None,
        sync_statistics: bool = True,
        default_lr: float = 0.0,
    ) -> None:
        self.engine, self.loader, self.kind, self.schedule = engine, loader, kind, schedule
        self.callbacks = CallbackList(callbacks)
        self.evaluator, self.checkpointer = evaluator, checkpointer
        self.inserted = inserted or {}
        self.device = device or torch.device("cpu")
        self.sync_statistics, self.default_lr = sync_statistics, default_lr
        self.world = distributed_world()

    def fit(self, state: TrainState | None = None) -> TrainState:
        """Train from ``state`` (a restored position, or the start) to the last step or a stop
        request; closes every callback when it ends, also on an error."""
        state = state or TrainState()
        failed = True
        try:
            if self.schedule.evaluate_initial and state.step == 0 and self.evaluator is not None:
                state.initial = self.evaluator.final(self.engine, prefix="init/")  # the starting model's score
                self.callbacks.on_metrics(0, state.initial)
            window = _Window()
            while state.step < self.schedule.steps and not state.stopped:
                self._step(state, window)
                self._after_step(state, window)
            failed = False
            return state
        finally:
            self.callbacks.close(failed)

    def _step(self, state: TrainState, window: _Window) -> None:
        engine = self.engine
        for _ in range(self.schedule.accumulation):
            out = compute(engine, next(self.loader), self.kind, self.device)
            # mode l2e: the inhibition is a loss term over this forward's selected values (zero otherwise)
            engine.backward(out.loss + memel.auxiliary_loss(engine.module))
            engine.step()
            window.add(out.loss, out.items)
            state.tokens_seen += out.items * self.world
        if self.sync_statistics:
            memel.sync(engine.module)
        state.step += 1
        window.steps += 1
        self.callbacks.post_step(state.step)

    def _after_step(self, state: TrainState, window: _Window) -> None:
        schedule, step = self.schedule, state.step
        if schedule.due(schedule.log_every, step):
            state.metrics = self._window_metrics(window, state.tokens_seen)
            if not math.isfinite(state.metrics["train/loss"]):  # the same reduced value on every rank
                raise NonFiniteLossError(step, state.metrics["train/loss"], state.metrics["train/lr"])
            self.callbacks.on_log(step, state.metrics)
            window.reset()
        if schedule.due(schedule.eval_every, step) and self.evaluator is not None:
            evaluation = self.evaluator.periodic(self.engine)
            state.metrics.update(evaluation)
            stop = self.callbacks.on_eval(step, evaluation)
            state.stopped = reduce_metrics({"stop": (float(stop), "max")}, self.device)["stop"] > 0
        if step == schedule.steps and schedule.evaluate_final and self.evaluator is not None:
            final = self.evaluator.final(self.engine, prefix="heldout/")
            state.metrics.update(final)
            self.callbacks.on_metrics(step, final)
        if self.inserted and schedule.due(schedule.stats_every, step):
            self._snapshot(state)
        if schedule.due(schedule.checkpoint_every, step) and self.checkpointer is not None:
            with tempfile.TemporaryDirectory(prefix="memel-ckpt-") as directory:
                self.checkpointer.save(Path(directory), step, state.tokens_seen)
                self.callbacks.on_checkpoint(step, Path(directory), state.report())

    def _window_metrics(self, window: _Window, tokens_seen: int) -> dict[str, float]:
        loss_sum = float(window.loss_sum)  # the window's one read from the device
        total = reduce_metrics({"loss": (loss_sum, "sum"), "items": (window.items, "sum")}, self.device)
        elapsed = time.perf_counter() - window.started
        lrs = self.engine.get_lr()
        metrics = {
            "train/loss": total["loss"] / max(total["items"], 1),
            "train/items_per_s": total["items"] / max(elapsed, 1e-9),
            "train/step_time_s": elapsed / max(window.steps, 1),
            "train/tokens_seen": float(tokens_seen),
            "train/lr": float(lrs[0]) if lrs else self.default_lr,
        }
        if self.kind == "text_lm":
            metrics["train/tokens_per_s"] = metrics["train/items_per_s"]
        return metrics

    def _snapshot(self, state: TrainState) -> None:
        snapshots = memel.snapshot(self.engine.module)  # a collective: every rank calls it
        divergence = rank_divergence(self.inserted, self.device)
        state.metrics["stats/rank_divergence"] = divergence
        state.metrics.update(snapshot_summary(snapshots))
        self.callbacks.on_snapshot(state.step, snapshots, state.tokens_seen)
        self.callbacks.on_metrics(state.step, {"stats/rank_divergence": divergence})
