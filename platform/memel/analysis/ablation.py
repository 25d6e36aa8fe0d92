"""Mean-ablation of a probed feature neuron (the paper's Figure 2), per token group.

For a trained byte LM and a token group (say ``python-code``; the rest of the tokens is
``other``): the sparse probe (:mod:`memel.analysis.probing`) picks the neuron whose activation
best separates the group's tokens on one half of the held-out windows (the probe half); that
neuron's value is replaced by its mean over the probe half, and on the other half (the
evaluation half) the loss is measured with and without the replacement:

    % increase of a group = 100 * (ablated loss - base loss) / base loss

(mean next-token cross-entropy over the group's target tokens). ``difference`` is the
group's % increase minus ``other``'s: > 0 when the ablation hurts the group more. The 95%
CIs resample the evaluation windows (paired bootstrap); the control mean-ablates as many
neurons drawn at random from the same modules, several times, and reports the mean and spread
of those draws.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .probing import Neuron, ProbeResult, TokenBatch, mlp_modules, probe

OTHER = "other"
DIFFERENCE = "difference"
LEVEL = 0.95


@contextlib.contextmanager
def mean_ablated(model: nn.Module, means: dict[Neuron, float]) -> Iterator[None]:
    """Within the block, each neuron in ``means`` outputs its mean at every position."""
    by_module: dict[str, dict[int, float]] = {}
    for neuron, value in means.items():
        by_module.setdefault(neuron.module, {})[neuron.index] = value

    def replace(chosen: dict[int, float]):
        index = torch.tensor(list(chosen), dtype=torch.long)
        value = torch.tensor(list(chosen.values()), dtype=torch.float64)

        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            values = output[0] if isinstance(output, (tuple, list)) else output
            changed = values.clone()
            changed[..., index] = value.to(changed.dtype)
            if isinstance(output, (tuple, list)):
                return type(output)([changed, *output[1:]])
            return changed

        return hook

    handles = [model.get_submodule(name).register_forward_hook(replace(chosen)) for name, chosen in by_module.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def window_losses(model: nn.Module, batches: list[TokenBatch]) -> np.ndarray:
    """``[windows, 2]``: per evaluation window, the summed next-token loss over the group's target
    tokens (column 0) and over the other tokens (column 1)."""
    model.eval()
    rows = []
    for batch in batches:
        logits = model(batch.inputs)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        losses = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none").view(
            batch.targets.shape
        )
        losses = losses.double()
        mask = batch.in_group.to(torch.bool)
        rows.append(torch.stack([(losses * mask).sum(1), (losses * ~mask).sum(1)], dim=1))
    return torch.cat(rows).numpy()


def token_counts(batches: list[TokenBatch]) -> np.ndarray:
    """``[windows, 2]``: group and other target tokens per window."""
    counts = [torch.stack([b.in_group.sum(1), (~b.in_group.to(torch.bool)).sum(1)], dim=1) for b in batches]
    return torch.cat(counts).double().numpy()


def percent_increase(base: np.ndarray, ablated: np.ndarray) -> np.ndarray:
    """``[..., 3]``: % loss increase of the group, of the other tokens, and their difference, from
    per-window loss sums ``[..., windows, 2]`` (the token counts cancel)."""
    base_sum, ablated_sum = base.sum(-2), ablated.sum(-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = 100.0 * (ablated_sum - base_sum) / base_sum
    return np.concatenate([pct, pct[..., :1] - pct[..., 1:2]], axis=-1)


def bootstrap_ci(base: np.ndarray, ablated: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """``[3, 2]``: 95% percentile CIs of :func:`percent_increase` over windows resampled with
    replacement (the same windows for base and ablated)."""
    rng = np.random.default_rng([seed, 31337])
    picks = rng.integers(0, len(base), size=(resamples, len(base)))
    samples = percent_increase(base[picks], ablated[picks])
    tail = (1 - LEVEL) / 2 * 100
    return np.nanpercentile(samples, [tail, 100 - tail], axis=0).T


def random_neurons(
    candidates: list[Neuron], count: int, draws: int, seed: int, exclude: set[Neuron]
) -> list[list[Neuron]]:
    """``draws`` seeded random sets of ``count`` distinct neurons from ``candidates`` minus ``exclude``."""
    pool = [n for n in candidates if n not in exclude]
    rng = np.random.default_rng([seed, 2718])
    return [[pool[i] for i in rng.choice(len(pool), size=min(count, len(pool)), replace=False)] for _ in range(draws)]


@dataclass
class AblationResult:
    """Per group (the group, ``other``, ``difference``): the probed neurons' effect and the control's."""

    rows: pd.DataFrame
    probe: ProbeResult
    chosen: list[Neuron]


def ablate(
    model: nn.Module,
    modules: list[str],
    probe_batches: list[TokenBatch],
    eval_batches: list[TokenBatch],
    group: str,
    count: int = 1,
    draws: int = 8,
    seed: int = 0,
    resamples: int = 1000,
) -> AblationResult:
    """Probe on ``probe_batches``, mean-ablate the ``count`` best neurons (means over
    ``probe_batches``), measure on ``eval_batches``; the control ablates ``count`` random neurons
    of ``modules``, ``draws`` times."""
    model.eval()
    found = probe(model, modules, probe_batches)
    ranked = found.table.sort_values("auroc", ascending=False, kind="stable").head(count)
    chosen = [Neuron(str(m), int(i)) for m, i in zip(ranked["module"], ranked["neuron"], strict=True)]
    candidates = [Neuron(str(m), int(i)) for m, i in zip(found.table["module"], found.table["neuron"], strict=True)]
    controls = random_neurons(candidates, count, draws, seed, set(chosen))
    means = found.means
    base = window_losses(model, eval_batches)
    with mean_ablated(model, {n: means[n] for n in chosen}):
        ablated = window_losses(model, eval_batches)
    effect, ci = percent_increase(base, ablated), bootstrap_ci(base, ablated, resamples, seed)
    control = []
    for neurons in controls:
        with mean_ablated(model, {n: means[n] for n in neurons}):
            control.append(percent_increase(base, window_losses(model, eval_batches)))
    control_array = np.array(control) if control else np.full((0, 3), np.nan)
    tokens = token_counts(eval_batches).sum(0)
    rows = []
    for column, name in enumerate((group, OTHER, DIFFERENCE)):
        drawn = control_array[:, column]
        rows.append(
            {
                "group": name,
                "tokens": int(tokens[column]) if column < 2 else int(tokens.sum()),
                "base_loss": base[:, column].sum() / tokens[column] if column < 2 else np.nan,
                "ablated_loss": ablated[:, column].sum() / tokens[column] if column < 2 else np.nan,
                "increase_pct": effect[column],
                "increase_pct_ci_low": ci[column, 0],
                "increase_pct_ci_high": ci[column, 1],
                "random_increase_pct_mean": float(drawn.mean()) if len(drawn) else np.nan,
                "random_increase_pct_std": float(drawn.std(ddof=1)) if len(drawn) > 1 else np.nan,
                "random_increase_pct_min": float(drawn.min()) if len(drawn) else np.nan,
                "random_increase_pct_max": float(drawn.max()) if len(drawn) else np.nan,
                "random_draws": len(drawn),
                "random_at_least_pct": float((drawn >= effect[column]).mean()) if len(drawn) else np.nan,
            }
        )
    frame = pd.DataFrame(rows)
    frame.insert(0, "neurons", ", ".join(n.label for n in chosen))
    frame.insert(1, "auroc", float(ranked["auroc"].iloc[0]) if count == 1 else float(ranked["auroc"].mean()))
    frame.insert(2, "candidates", len(candidates))
    return AblationResult(frame, found, chosen)


def lm_batches(data: dict[str, Any], batch_size: int, batches: int, group: str, seed: int = 0) -> list[TokenBatch]:
    """Up to ``batches`` held-out batches of a ``text_lm`` data config, each target token marked by
    whether its document's label is ``group`` (spread evenly over the held-out windows)."""
    from memel.data import TextLMLoader

    from .heldout import heldout_loader

    loader = heldout_loader(data, batch_size, seed)
    if not isinstance(loader, TextLMLoader):
        raise ValueError(f"the probing ablation needs token-level LM data (kind text_lm); got {data.get('kind')!r}")
    names = loader.stream.label_names
    if group not in names:
        raise ValueError(
            f"the held-out data has no {group!r} tokens (its document labels: {names or 'none'}); "
            "train on data with that group (e.g. corpus: mixed) or pick another --probe-group"
        )
    total = loader.num_examples()
    wanted = min(total, batches * batch_size)
    order = np.unique(np.linspace(0, total - 1, wanted).round().astype(np.int64))
    out = []
    for start in range(0, len(order) - batch_size + 1, batch_size):
        chunk = order[start : start + batch_size]
        batch = loader.fetch(chunk)
        marked = torch.from_numpy(loader.window_labels(chunk) == names.index(group))
        out.append(TokenBatch(batch.inputs, batch.targets, marked[:, 1:].contiguous(), marked[:, :-1].contiguous()))
    if len(out) < 2:
        raise ValueError(
            f"only {len(out)} held-out batch(es) of {batch_size} windows; need 2 (one to probe, one to measure)"
        )
    return out


def ablate_member(
    trained: Any, group: str, batches: int, batch_size: int, count: int = 1, draws: int = 8
) -> AblationResult:
    """:func:`ablate` on a rebuilt member (:func:`memel.analysis.checkpoint.load_member`): every MLP
    activation of the model is a candidate; alternate held-out batches probe and measure."""
    from memel.models import preset_targets

    spec = trained.spec
    data = lm_batches(spec.data, batch_size, batches, group, spec.train.seed)
    modules = mlp_modules(trained.model, preset_targets(trained.model, "mlp"))
    return ablate(trained.model, modules, data[0::2], data[1::2], group, count, draws, spec.train.seed)
