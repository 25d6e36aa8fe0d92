"""Held-out evaluation of a run: periodic (the same ``eval.batches`` batches per rank every time,
spread evenly over the held-out set) and final (``eval.final`` batches from the held-out set's
start, or ``all`` of it once, split across ranks).

Per-rank sums are reduced across ranks by :func:`memel.training.metrics.reduce_metrics`, so
every rank gets the same numbers; every rank must evaluate at the same step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from memel.data import FixedBatches
from memel.data import build as build_loader

from .metrics import reduce_metrics
from .objective import compute
from .spec import TrainSpec


def evaluate(
    engine: Any, loader: Any, batches: int, kind: str, device: torch.device, count: bool = False
) -> dict[str, float]:
    """``eval/loss`` (plus perplexity or accuracy by kind) over ``batches`` batches of ``loader``;
    ``count`` adds ``eval/items`` and, for nowcasting, the paper's B-MSE / B-MAE."""
    engine.module.eval()
    sums = {"loss": 0.0, "items": 0.0, "correct": 0.0, "b_mse": 0.0, "b_mae": 0.0}
    with torch.no_grad():
        for _, batch in zip(range(batches), loader):
            out = compute(engine, batch, kind, device)
            sums["loss"] += float(out.loss) * out.items
            sums["items"] += out.items
            sums["correct"] += float(out.correct) if out.correct is not None else 0.0
            if count and kind == "nowcast":  # summed over frames, per sequence
                batch_mse, batch_mae = _balanced_sums(engine, batch, device)
                sums["b_mse"], sums["b_mae"] = sums["b_mse"] + batch_mse, sums["b_mae"] + batch_mae
    engine.module.train()
    total = reduce_metrics({name: (value, "sum") for name, value in sums.items()}, device)
    items = max(total["items"], 1)
    metrics = {"eval/loss": total["loss"] / items}
    if count:
        metrics["eval/items"] = total["items"]
        if kind == "nowcast":
            metrics |= {"eval/b_mse": total["b_mse"] / items, "eval/b_mae": total["b_mae"] / items}
    if kind == "text_lm":
        metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 50.0))
    elif kind != "nowcast":
        metrics["eval/accuracy"] = total["correct"] / items
    return metrics


def _balanced_sums(engine: Any, batch: Any, device: torch.device) -> tuple[float, float]:
    """B-MSE and B-MAE of one nowcast batch, summed over its sequences."""
    from memel.models.nowcasting_metrics import b_mae, b_mse

    inputs, targets = batch.inputs.to(device), batch.targets.to(device).float()
    prediction = engine(inputs, targets.shape[1]).float()
    size = targets.shape[0]
    return float(b_mse(prediction, targets)) * size, float(b_mae(prediction, targets)) * size


class HeldoutEvaluation:
    """A spec's periodic and final evaluations on this rank's share of the held-out set."""

    def __init__(self, spec: TrainSpec, kind: str, device: torch.device, rank: int, world: int) -> None:
        self.spec, self.kind, self.device, self.rank, self.world = spec, kind, device, rank, world
        data = {**spec.data, "batch_size": spec.train.micro_batch_size, "seed": spec.train.seed, "split": "heldout"}
        #: the periodic evaluation's batches: fixed for the run, so eval/loss changes only with the model
        self.fixed = FixedBatches(build_loader(data, rank, world), spec.eval.batches)

    def periodic(self, engine: Any) -> dict[str, float]:
        """``eval.batches`` batches per rank: the same held-out examples at every evaluation of the run."""
        return evaluate(engine, self.fixed, len(self.fixed), self.kind, self.device)

    def final(self, engine: Any, prefix: str) -> dict[str, float]:
        """``eval.final`` batches of the held-out set from its start (``all``: every sample once,
        split across ranks), named ``<prefix>loss`` etc., plus ``<prefix>items``; without
        ``eval.final``, ``eval.batches`` batches from the start."""
        spec = self.spec
        final = spec.eval.final if spec.eval.final is not None else spec.eval.batches
        # seed 0: the same held-out set for every run (generated data, e.g. radar echoes, depends on the seed)
        data = {
            **spec.data,
            "batch_size": spec.train.micro_batch_size,
            "seed": 0,
            "split": "heldout",
            "shuffle": False,
            "epochs": 1,
            "drop_last": False,
            "even_shards": False,
        }
        loader = build_loader(data, self.rank, self.world)
        batches = len(loader) if final == "all" else int(final)
        evaluation = evaluate(engine, loader, batches, self.kind, self.device, count=True)
        return {f"{prefix}{name.split('/', 1)[1]}": value for name, value in evaluation.items()}
