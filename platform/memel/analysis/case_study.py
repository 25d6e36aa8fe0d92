"""Inhibition case study (the paper's Table 4): what one optimizer step under each mode does to
the values it modified, on a trained model with its own optimizer state.

For every batch, every selection (``top_ms``: each sample's top-n Monosemantic Scale values, as
the Inhibitor selects them; ``random``: the same count of uniformly random values per sample, a
control) and every mode (``original``, ``naive_a``, ``naive_b``, ``rd``), starting each time from
the same weights, optimizer state and statistics:

1. forward ``x`` in training mode (seeded: dropout masks are the batch's own). At every target
   module the values ``z`` are recorded, the chosen values are picked in THIS forward (against
   the trained statistics) and modified by the mode: ``z' = -D*z + (mean + D*z).detach()``
   (D = 0 for ``naive_a``, -1 for ``naive_b``, the run's strength for ``rd``; ``original``
   leaves them); the gradient arriving at each chosen value is recorded;
2. the objective's backward, gradient clipping as in training and one optimizer step (the run's
   AdamW with its moments and step count, at the run's last learning rate or a given one);
3. forward ``x`` again, same mode, same seed, the same values replaced as in 1: ``z'`` are the
   values arriving at the targets, so ``z'`` differs from ``z`` by the weight update alone.

Per batch and pass, over the chosen values (phi against the trained statistics, before the step):

- Decrease Ratio = mean of ``(1 - phi(z')/phi(z))`` x 100% (the paper's definition), and its pooled
  form ``(1 - sum phi(z') / sum phi(z))`` x 100%, which values near the mean (phi ~ 0, as random
  choices mostly are) cannot dominate;
- Total Update Ratio = mean of ``|z'/z - 1|`` x 100% over the same values (``update_ratio``) and
  over every value (``update_ratio_all``); values with ``|z| <= 1e-6`` are left out;
- ``quotient`` = Decrease Ratio / Total Update Ratio: both grow in proportion to the step, so
  their quotient compares modes free of the learning rate;
- Lemma 3.3's alignment diagnostic: ``alignment`` = the fraction of chosen values whose gradient
  g at the modified value (``z' = mean`` for the naive modes and RD) points back towards z, i.e.
  ``sign(-g) == sign(z - mean)`` (values with g = 0 or z = mean are left out), and
  ``alignment_weighted`` = the same with each value weighted by ``|g| * |z - mean|``. NaN for
  ``original``, whose values stay at z.

The model runs in float64, so changes of a relative size 1e-9 (one step at lr 2e-6) are measured.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from .monosemantic_ratio import mean_ci

MODES = ("original", "naive_a", "naive_b", "rd")
SELECTIONS = ("top_ms", "random")

#: The paper's Table 4 (Swin-B, one step at lr 2e-6): Decrease Ratio and Total Update Ratio, %.
PAPER_TABLE4: dict[str, tuple[float, float]] = {
    "original": (0.003, 0.052),
    "naive_a": (-0.017, 0.118),
    "naive_b": (-0.044, 0.161),
    "rd": (0.013, 0.189),
}

#: Values this close to 0 are left out of the update ratios (|z'/z - 1| is unbounded there).
TINY = 1e-6

#: The columns a pass reports (one row per batch, lr, selection and mode).
MEASURES = (
    "decrease_ratio",
    "decrease_ratio_pooled",
    "update_ratio",
    "update_ratio_all",
    "quotient",
    "alignment",
    "alignment_weighted",
)

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def phi(values: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """The Monosemantic Scale of ``[samples, neurons]`` values in float64 (as ``Inhibitor.monosemantic_scale``)."""
    from memel.inhibition.statistics import variance_denominator

    return (values.double() - mean.double()).square() / variance_denominator(var, eps)


def strength_of(mode: str, strength: float) -> float | None:
    """D applied to a chosen value by ``mode`` (None: ``original`` leaves it)."""
    return {"original": None, "naive_a": 0.0, "naive_b": -1.0}.get(mode, strength)


@dataclass
class Statistics:
    """One target's trained per-neuron statistics (flat neuron order) and how its values are laid out."""

    mean: torch.Tensor
    var: torch.Tensor
    layout: str  # "element" (one row per sample) or "channel" (one row per position)

    def rows(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` as ``[samples, neurons]``: what top-n is per."""
        return value.reshape(value.shape[0], -1) if self.layout == "element" else value.reshape(-1, value.shape[-1])


@dataclass
class OptimizerState:
    """The optimizer to take the step with: AdamW hyperparameters, and its moments by parameter name
    (empty: a fresh optimizer), or plain SGD (``kind="sgd"``)."""

    lr: float
    kind: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def build(self, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
        """A fresh optimizer over ``model``'s parameters holding the saved moments (float64 copies)."""
        params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        rate = self.lr if lr is None else lr
        if self.kind == "sgd":
            return torch.optim.SGD([p for _, p in params], lr=rate)
        optimizer = torch.optim.AdamW(
            [p for _, p in params], lr=rate, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay
        )
        for name, p in params:
            saved = self.state.get(name)
            if saved:
                optimizer.state[p] = {
                    "step": saved["step"].detach().clone().float().reshape(()),
                    "exp_avg": saved["exp_avg"].detach().to(p.dtype).reshape(p.shape).clone(),
                    "exp_avg_sq": saved["exp_avg_sq"].detach().to(p.dtype).reshape(p.shape).clone(),
                }
        return optimizer


class Modifier:
    """Forward hooks on the targets that choose values, apply a mode to them and record z, the
    choice and the gradient at the modified values. ``replay`` reuses the choice of a previous forward."""

    def __init__(
        self,
        model: nn.Module,
        stats: dict[str, Statistics],
        mode: str,
        strength: float,
        top_n: int,
        eps: float,
        selection: str = "top_ms",
        generator: torch.Generator | None = None,
    ) -> None:
        self.stats, self.mode, self.top_n, self.eps, self.selection = stats, mode, top_n, eps, selection
        self.strength = strength_of(mode, strength)
        self.generator = generator
        self.values: dict[str, torch.Tensor] = {}
        self.chosen: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self.replay = False
        modules = dict(model.named_modules())
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in stats]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def choose(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Indices ``[samples, top_n]`` of the values to modify in each row."""
        n = min(self.top_n, rows.shape[1])
        if self.selection == "random":
            noise = torch.rand(rows.shape, generator=self.generator, dtype=torch.float64).to(rows.device)
            return noise.topk(n, dim=1).indices
        stats = self.stats[name]
        return phi(rows.detach(), stats.mean, stats.var, self.eps).topk(n, dim=1).indices

    def _hook(self, name: str) -> Callable[..., Any]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            value = output if isinstance(output, torch.Tensor) else output[0]
            stats = self.stats[name]
            rows = stats.rows(value)
            self.values[name] = rows.detach().clone()
            if not self.replay:
                self.chosen[name] = self.choose(name, rows)
            chosen = self.chosen[name]
            if self.strength is None:
                out = rows
            else:
                mask = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, chosen, True)
                mean = stats.mean.to(rows.dtype).expand_as(rows)
                d = self.strength
                out = torch.where(mask, -d * rows + (mean + d * rows).detach(), rows)
            if out.requires_grad:
                out.register_hook(
                    lambda grad, name=name, chosen=chosen: self.grads.__setitem__(
                        name, grad.gather(1, chosen).detach().clone()
                    )
                )
            out = out.reshape(value.shape)
            return out if isinstance(output, torch.Tensor) else type(output)([out, *output[1:]])

        return hook


@dataclass
class PassResult:
    """What one pass measured, as per-value tensors over all targets (for pooled statistics)."""

    z: torch.Tensor
    z_new: torch.Tensor
    phi: torch.Tensor
    phi_new: torch.Tensor
    mean: torch.Tensor
    grad: torch.Tensor | None
    z_all: torch.Tensor
    z_new_all: torch.Tensor
    loss: float


def measures(result: PassResult, aligned_modes: bool) -> dict[str, float]:
    """The pass's Decrease Ratio, update ratios, their quotient and the alignment diagnostic."""
    positive = result.phi > 0
    decrease = (1 - result.phi_new[positive] / result.phi[positive]) * 100
    big = result.z.abs() > TINY
    update = (result.z_new[big] / result.z[big] - 1).abs() * 100
    every = result.z_all.abs() > TINY
    update_all = (result.z_new_all[every] / result.z_all[every] - 1).abs() * 100
    out = {
        "decrease_ratio": float(decrease.mean()) if decrease.numel() else math.nan,
        "decrease_ratio_pooled": float((1 - result.phi_new[positive].sum() / result.phi[positive].sum()) * 100)
        if positive.any()
        else math.nan,
        "update_ratio": float(update.mean()) if update.numel() else math.nan,
        "update_ratio_all": float(update_all.mean()) if update_all.numel() else math.nan,
    }
    out["quotient"] = out["decrease_ratio"] / out["update_ratio"] if out["update_ratio"] > 0 else math.nan
    out |= (
        alignment(result.grad, result.z, result.mean)
        if aligned_modes
        else {"alignment": math.nan, "alignment_weighted": math.nan}
    )
    return out


def alignment(grad: torch.Tensor | None, z: torch.Tensor, mean: torch.Tensor) -> dict[str, float]:
    """Lemma 3.3's diagnostic: the fraction of values whose descent direction -grad points from
    the mean towards z, plain and weighted by ``|grad| * |z - mean|`` (zeros left out)."""
    if grad is None:
        return {"alignment": math.nan, "alignment_weighted": math.nan}
    g, offset = grad.double(), z.double() - mean.double()
    usable = (g != 0) & (offset != 0)
    if not usable.any():
        return {"alignment": math.nan, "alignment_weighted": math.nan}
    aligned = (torch.sign(-g) == torch.sign(offset))[usable].double()
    weight = (g.abs() * offset.abs())[usable]
    return {"alignment": float(aligned.mean()), "alignment_weighted": float((aligned * weight).sum() / weight.sum())}


def one_pass(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    optimizer: OptimizerState,
    stats: dict[str, Statistics],
    batch: Any,
    seed: int,
    loss_fn: LossFn,
    mode: str,
    selection: str = "top_ms",
    lr: float | None = None,
    strength: float = 1.0,
    top_n: int = 1,
    eps: float = 0.01,
) -> PassResult:
    """One step of the case study on ``model`` (reset to ``weights`` first; left at the stepped weights)."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(weights[name])
    step = optimizer.build(model, lr)
    modifier = Modifier(model, stats, mode, strength, top_n, eps, selection, torch.Generator().manual_seed(seed))
    try:
        model.train()
        torch.manual_seed(seed)
        step.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        if optimizer.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], optimizer.grad_clip)
        step.step()
        before, chosen, grads = dict(modifier.values), dict(modifier.chosen), dict(modifier.grads)
        modifier.replay = True
        torch.manual_seed(seed)
        with torch.no_grad():
            loss_fn(model, batch)
        after = dict(modifier.values)
    finally:
        modifier.remove()
    z, z_new, p, p_new, means, g, z_all, z_new_all = [], [], [], [], [], [], [], []
    for name, s in stats.items():
        pick = chosen[name]
        zb, za = before[name].double(), after[name].double()
        phi_b, phi_a = phi(zb, s.mean, s.var, eps), phi(za, s.mean, s.var, eps)
        z.append(zb.gather(1, pick).flatten())
        z_new.append(za.gather(1, pick).flatten())
        p.append(phi_b.gather(1, pick).flatten())
        p_new.append(phi_a.gather(1, pick).flatten())
        means.append(s.mean.double().expand_as(zb).gather(1, pick).flatten())
        if name in grads:
            g.append(grads[name].flatten())
        z_all.append(zb.flatten())
        z_new_all.append(za.flatten())
    return PassResult(
        torch.cat(z),
        torch.cat(z_new),
        torch.cat(p),
        torch.cat(p_new),
        torch.cat(means),
        torch.cat(g) if len(g) == len(stats) else None,
        torch.cat(z_all),
        torch.cat(z_new_all),
        float(loss.detach()),
    )


@dataclass
class Subject:
    """What the case study steps: a model with its weights, optimizer state and trained statistics."""

    model: nn.Module
    optimizer: OptimizerState
    stats: dict[str, Statistics]
    strength: float = 1.0
    top_n: int = 1
    eps: float = 0.01
    label: str = ""
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.weights:
            self.weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def case_study(
    subject: Subject,
    batches: dict[int, Any],
    loss_fn: LossFn,
    modes: Iterable[str] = MODES,
    selections: Iterable[str] = SELECTIONS,
    lrs: dict[str, float | None] | None = None,
) -> pd.DataFrame:
    """One row per batch seed, learning rate (name -> value; None: the optimizer's own), selection and mode.

    ``subject.model`` is stepped in place and restored to its weights at the end."""
    rows = []
    lrs = lrs or {"run": None}
    for seed, batch in batches.items():
        for lr_name, lr in lrs.items():
            for selection in selections:
                for mode in modes:
                    result = one_pass(
                        subject.model,
                        subject.weights,
                        subject.optimizer,
                        subject.stats,
                        batch,
                        seed,
                        loss_fn,
                        mode,
                        selection,
                        lr,
                        subject.strength,
                        subject.top_n,
                        subject.eps,
                    )
                    rows.append(
                        {
                            "member": subject.label,
                            "lr_name": lr_name,
                            "lr": subject.optimizer.lr if lr is None else lr,
                            "selection": selection,
                            "mode": mode,
                            "batch": seed,
                            "loss": result.loss,
                            "selected": int(result.z.numel()),
                            **measures(result, mode != "original"),
                        }
                    )
    with torch.no_grad():
        for name, tensor in subject.model.state_dict().items():
            tensor.copy_(subject.weights[name])
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ summaries
GROUP = ["variant", "lr_name", "selection"]


def summarize_case_study(per_batch: pd.DataFrame) -> pd.DataFrame:
    """Per variant, lr, selection and mode: mean and 95% CI over batches of every measure, the
    paired differences of the Decrease Ratio and of the quotient against ``original`` and against
    ``naive_b`` on the same batch, and the paper's values."""
    frame = per_batch if "variant" in per_batch else per_batch.assign(variant="shared")
    rows = []
    for keys, part in frame.groupby(GROUP, sort=False):
        by_mode = {mode: group.set_index("batch") for mode, group in part.groupby("mode")}
        for mode in [m for m in MODES if m in by_mode] + sorted(set(by_mode) - set(MODES)):
            this = by_mode[mode]
            row: dict[str, Any] = dict(zip(GROUP, keys)) | {
                "mode": mode,
                "batches": len(this),
                "lr": float(this["lr"].iloc[0]),
            }
            for column in MEASURES:
                mean, std, low, high = mean_ci(this[column])
                row |= {column: mean, f"{column}_ci_low": low, f"{column}_ci_high": high}
            for base in ("original", "naive_b"):
                for column in ("decrease_ratio", "quotient"):
                    key = f"{column}_vs_{base}"
                    if base in by_mode and mode != base:
                        difference = this[column] - by_mode[base][column].reindex(this.index)
                        mean, _, low, high = mean_ci(difference)
                        row |= {key: mean, f"{key}_ci_low": low, f"{key}_ci_high": high}
                    else:
                        row |= {key: math.nan, f"{key}_ci_low": math.nan, f"{key}_ci_high": math.nan}
            paper = PAPER_TABLE4.get(mode, (math.nan, math.nan))
            row["paper_decrease_ratio"], row["paper_total_update_ratio"] = paper
            row["paper_quotient"] = paper[0] / paper[1] if paper[1] else math.nan
            rows.append(row)
    return pd.DataFrame(rows)


#: The paper's ordering claims on the Decrease Ratio: (a, b) reads "a above b".
CLAIMS = (("rd", "original"), ("rd", "naive_b"), ("rd", "naive_a"), ("original", "naive_b"), ("naive_a", "naive_b"))


def verdicts(per_batch: pd.DataFrame, variant: str = "shared", selection: str = "top_ms") -> pd.DataFrame:
    """Each ordering claim of Table 4 on the Decrease Ratio, per learning rate, from the paired 95% CI of
    ``a - b`` over batches: ``reproduced`` (CI above 0), ``contradicted`` (CI below 0) or ``inconclusive``."""
    frame = per_batch if "variant" in per_batch else per_batch.assign(variant="shared")
    part = frame[(frame["variant"] == variant) & (frame["selection"] == selection)]
    rows = []
    for lr_name, group in part.groupby("lr_name", sort=False):
        present = set(group["mode"])
        for a, b in CLAIMS:
            if not {a, b} <= present:
                continue
            mean, low, high = paired_ci(group, a, b)
            verdict = (
                "inconclusive" if math.isnan(low) or low <= 0 <= high else "reproduced" if low > 0 else "contradicted"
            )
            rows.append(
                {
                    "variant": variant,
                    "lr_name": lr_name,
                    "claim": f"{a} > {b}",
                    "difference": mean,
                    "difference_ci_low": low,
                    "difference_ci_high": high,
                    "paper_difference": PAPER_TABLE4[a][0] - PAPER_TABLE4[b][0],
                    "verdict": verdict,
                }
            )
    return pd.DataFrame(rows)


def paired_ci(per_batch: pd.DataFrame, a: str, b: str, column: str = "decrease_ratio") -> tuple[float, float, float]:
    """(mean, low, high) of ``a - b`` in ``column`` paired by batch (rows of one variant, lr and selection)."""
    left = per_batch[per_batch["mode"] == a].set_index("batch")[column]
    right = per_batch[per_batch["mode"] == b].set_index("batch")[column]
    mean, _, low, high = mean_ci(left - right.reindex(left.index))
    return mean, low, high


# ------------------------------------------------------------------------------ trained members
def member_subject(trained: Any, optimizer: OptimizerState, label: str = "") -> Subject:
    """A :class:`Subject` from a rebuilt member (its weights, optimizer state and Inhibitor statistics), in float64."""
    import memel

    config = trained.spec.inhibition or memel.InhibitionConfig()
    model = copy.deepcopy(trained.model).double()
    stats = {}
    for name in trained.inhibition:
        module = memel.Inhibitor(config.model_copy(update={"kernel": "eager"}))
        module.load_state_dict(trained.inhibition[name])
        if not module.initialized:
            continue
        found = module.statistics()
        stats[name] = Statistics(found["mean"].reshape(-1).double(), found["var"].reshape(-1).double(), config.layout)
    if not stats:
        raise ValueError("the checkpoint's Inhibitors have no statistics (was the run trained with inhibition?)")
    top_n = config.top_n if config.select == "top_n" else 1
    return Subject(model, optimizer, stats, config.strength, top_n, config.eps, label)


def member_batches(trained: Any, count: int, batch_size: int | None = None) -> dict[int, Any]:
    """``count`` fixed training batches: batch ``s`` is the first of the data shuffled with seed ``s``."""
    from memel.data import build

    spec = trained.spec
    size = batch_size or spec.train.micro_batch_size
    return {
        seed: next(iter(build({**spec.data, "batch_size": size, "seed": seed, "split": "train"})))
        for seed in range(count)
    }


def member_loss(kind: str) -> LossFn:
    """The run's objective on a float64 model (floating inputs and targets cast to float64)."""
    from memel.training.objective import compute

    def loss(model: nn.Module, batch: Any) -> torch.Tensor:
        cast = type(batch)(*(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in batch))
        return compute(model, cast, kind, next(model.parameters()).device).loss

    return loss
