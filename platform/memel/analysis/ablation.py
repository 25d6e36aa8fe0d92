"""Deactivation ablation (the paper's Figure 2): clamp the most monosemantic neurons to their
held-out mean and measure the loss increase per feature group.

For each trained member: the ``k`` most monosemantic neurons of every inserted module come
from its statistics (:func:`memel.analysis.monosemantic_ratio.top_neurons`); each neuron's
mean over the held-out batches is measured with the model as trained; then every held-out
sample's loss is computed three times: as trained, with the chosen neurons set to their
mean, and (a control) with ``k`` random neurons per module set to their mean. Loss increase
= ablated - base, per group of samples (:mod:`memel.analysis.heldout`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .heldout import sample_losses


def _values(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _neurons_view(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """``[samples, neurons]`` view of a module output (as the Inhibitor sees it)."""
    if layout == "element":
        return tensor.reshape(tensor.shape[0], -1)
    return tensor.reshape(-1, tensor.shape[-1])


@torch.no_grad()
def neuron_means(
    model: nn.Module, modules: list[str], batches: list[Any], kind: str, layout: str = "channel"
) -> dict[str, torch.Tensor]:
    """Every neuron's mean output (float64) over all samples of ``batches``, per module."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            values = _neurons_view(_values(output).detach(), layout).double()
            sums[name] = sums.get(name, 0) + values.sum(0)
            counts[name] = counts.get(name, 0) + values.shape[0]

        return hook

    handles = [model.get_submodule(name).register_forward_hook(record(name)) for name in modules]
    try:
        for batch in batches:
            sample_losses(model, batch, kind)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in modules}


@contextlib.contextmanager
def clamped(
    model: nn.Module, chosen: dict[str, list[int]], means: dict[str, torch.Tensor], layout: str = "channel"
) -> Iterator[None]:
    """Within the block, the ``chosen`` neurons of each module output their value in ``means``."""

    def replace(name: str):
        index = torch.tensor(chosen[name], dtype=torch.long)

        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            values = _values(output)
            changed = values.clone()
            view = _neurons_view(changed, layout)
            view[:, index] = means[name][index].to(view.dtype)
            if isinstance(output, (tuple, list)):
                return type(output)([changed, *output[1:]])
            return changed

        return hook

    handles = [model.get_submodule(name).register_forward_hook(replace(name)) for name in chosen if chosen[name]]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def random_neurons(means: dict[str, torch.Tensor], k: int, seed: int) -> dict[str, list[int]]:
    """``k`` distinct random neurons per module (seeded): the ablation's control."""
    rng = np.random.default_rng([seed, 2718])
    return {
        name: sorted(int(i) for i in rng.choice(len(mean), size=min(k, len(mean)), replace=False)) for name, mean in means.items()
    }


@torch.no_grad()
def group_losses(model: nn.Module, batches: list[tuple[Any, list[list[str]]]], kind: str) -> dict[str, tuple[float, float]]:
    """Per group: (summed loss, items)."""
    totals: dict[str, list[float]] = {}
    for batch, groups in batches:
        losses, items = sample_losses(model, batch, kind)
        for loss, count, names in zip(losses.tolist(), items.tolist(), groups, strict=True):
            for name in names:
                entry = totals.setdefault(name, [0.0, 0.0])
                entry[0] += loss
                entry[1] += count
    return {name: (value[0], value[1]) for name, value in totals.items()}


def ablate(
    model: nn.Module, batches: list[tuple[Any, list[list[str]]]], kind: str, chosen: dict[str, list[int]],
    layout: str = "channel", control_seed: int = 0,
) -> pd.DataFrame:  # fmt: skip
    """Per group: items, base loss, loss with ``chosen`` clamped to the held-out mean, loss with as
    many random neurons clamped, and both increases."""
    model.eval()
    modules = list(chosen)
    means = neuron_means(model, modules, [b for b, _ in batches], kind, layout)
    k = max((len(v) for v in chosen.values()), default=0)
    base = group_losses(model, batches, kind)
    with clamped(model, chosen, means, layout):
        ablated = group_losses(model, batches, kind)
    with clamped(model, random_neurons(means, k, control_seed), means, layout):
        control = group_losses(model, batches, kind)
    rows = []
    for group, (loss, items) in sorted(base.items(), key=lambda item: (item[0] != "all", item[0])):
        row = {"group": group, "items": items, "base_loss": loss / items, "ablated_loss": ablated[group][0] / items,
               "random_loss": control[group][0] / items}  # fmt: skip
        row["increase"] = row["ablated_loss"] - row["base_loss"]
        row["random_increase"] = row["random_loss"] - row["base_loss"]
        rows.append(row)
    return pd.DataFrame(rows)


def ablate_member(trained: Any, chosen: dict[str, list[int]], batches: int, batch_size: int) -> pd.DataFrame:
    """:func:`ablate` on a rebuilt member (:func:`memel.analysis.checkpoint.load_member`) with its
    own held-out data."""
    from .heldout import grouped_batches

    spec = trained.spec
    data = list(grouped_batches(spec.data, batch_size, batches, spec.train.seed))
    layout = spec.inhibition.layout if spec.inhibition is not None else "channel"
    unknown = [name for name in chosen if name not in dict(trained.model.named_modules())]
    if unknown:
        raise ValueError(f"statistics name modules {unknown} that {spec.model.name} does not have")
    return ablate(trained.model, data, trained.kind, chosen, layout, spec.train.seed)
