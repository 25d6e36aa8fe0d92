"""Sparse probing (one neuron): which single MLP neuron best tells a token group from the rest.

Every neuron of the given modules (channel layout: one neuron per output channel, one value
per token) is scored by the AUROC of its activation for "token in the group" against "token
not in it", on held-out tokens. AUROC 1: the neuron is higher on every group token than on
every other token; 0.5: no better than chance. The best "group" neuron is the one with the
highest AUROC (it fires *for* the group, as the paper's "French" neuron fires for French).

The AUROC is the Mann-Whitney statistic: the probability that a group token's activation
exceeds an other token's, ties counting one half, computed exactly by sorting each neuron's
values on the other tokens and counting, for every group token, how many lie below and at it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn


class TokenBatch(NamedTuple):
    """Held-out LM tokens: ``inputs``/``targets`` int64 ``[B, T]``; ``in_group`` bool ``[B, T]``: whether
    each target token belongs to the probed group (the loss is grouped by it); ``input_in_group``:
    the same for each input token (the probe labels the activation at a position by it)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    in_group: torch.Tensor
    input_in_group: torch.Tensor


@dataclass(frozen=True)
class Neuron:
    """One channel of one module's output."""

    module: str
    index: int

    @property
    def label(self) -> str:
        return f"{self.module}[{self.index}]"


@dataclass
class ProbeResult:
    """Every candidate neuron's AUROC (``table``: module, neuron, auroc), the best one, and the
    tokens it was measured on."""

    table: pd.DataFrame
    best: Neuron
    best_auroc: float
    tokens: int
    group_tokens: int
    #: every neuron's mean activation over all probed tokens (summed in float64)
    means: dict[Neuron, float]


def mlp_modules(model: nn.Module, patterns: list[str]) -> list[str]:
    """The names of ``model``'s modules that match any fnmatch pattern (in model order)."""
    found = [name for name, _ in model.named_modules() if name and any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not found:
        raise ValueError(f"no module of {type(model).__name__} matches {patterns}")
    return found


def _channels(output: Any) -> torch.Tensor:
    values = output[0] if isinstance(output, (tuple, list)) else output
    return values.detach().reshape(-1, values.shape[-1])


@torch.no_grad()
def activations(
    model: nn.Module, modules: list[str], batches: list[TokenBatch]
) -> tuple[torch.Tensor, torch.Tensor, list[Neuron]]:
    """``(values [tokens, neurons], input_in_group [tokens] bool, neurons)``: every neuron's output at
    every position of ``batches`` (columns in module order, then channel order; float32, or float64
    for a float64 model)."""
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def record(name: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            values = _channels(output)
            captured[name].append((values if values.dtype == torch.float64 else values.float()).cpu())

        return hook

    model.eval()
    handles = [model.get_submodule(name).register_forward_hook(record(name)) for name in modules]
    try:
        for batch in batches:
            model(batch.inputs)
    finally:
        for handle in handles:
            handle.remove()
    columns, neurons = [], []
    for name in modules:
        values = torch.cat(captured[name])
        columns.append(values)
        neurons += [Neuron(name, i) for i in range(values.shape[1])]
    labels = torch.cat([b.input_in_group.reshape(-1) for b in batches]).to(torch.bool)
    return torch.cat(columns, dim=1), labels, neurons


def auroc(values: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per column of ``values [n, m]``: AUROC of the column for ``labels [n]`` (True = positive)."""
    values = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    labels = torch.as_tensor(np.asarray(labels, dtype=bool) if not isinstance(labels, torch.Tensor) else labels).to(
        torch.bool
    )
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(f"AUROC needs both classes; got {positives} group and {negatives} other tokens")
    if values.dim() == 1:
        values = values[:, None]
    scores = []
    for start in range(0, values.shape[1], 256):  # columns in chunks: bounded memory
        chunk = values[:, start : start + 256].T.contiguous()
        sorted_other = chunk[:, ~labels].sort(dim=1).values
        group = chunk[:, labels].contiguous()
        below = torch.searchsorted(sorted_other, group, right=False).double().sum(1)
        at_or_below = torch.searchsorted(sorted_other, group, right=True).double().sum(1)
        scores.append((below + at_or_below) / 2 / (positives * negatives))
    return torch.cat(scores).numpy()


def probe(model: nn.Module, modules: list[str], batches: list[TokenBatch]) -> ProbeResult:
    """The AUROC of every neuron of ``modules`` for the group on ``batches``; the best is the highest."""
    values, labels, neurons = activations(model, modules, batches)
    scores = auroc(values, labels)
    means = values.mean(0, dtype=torch.float64).tolist()
    table = pd.DataFrame({"module": [n.module for n in neurons], "neuron": [n.index for n in neurons], "auroc": scores})
    best = int(np.argmax(scores))
    return ProbeResult(
        table,
        neurons[best],
        float(scores[best]),
        len(labels),
        int(labels.sum()),
        dict(zip(neurons, means, strict=True)),
    )
