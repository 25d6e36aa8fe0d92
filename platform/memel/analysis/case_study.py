"""Inhibition case study (the paper's Table 4): what one optimizer step under each mode does
to the monosemantic values it selected.

For a trained model, a fixed batch per seed and each mode (``original``, ``naive_a``,
``naive_b``, ``rd``), starting every time from the same weights and the same trained
statistics:

1. ``z``: every inserted module's activation on the batch (eval forward: nothing modified);
2. one training forward with the mode applied from the first call (``late_start=0``), the
   objective's backward and one optimizer step;
3. ``z'``: the activations on the same inputs again (eval forward).

The selected values are each sample's top-n ``phi(z)`` (what the module selects), with phi
measured against the statistics as they were before the step, for ``z`` and ``z'`` alike.
Decrease Ratio = mean over selected values of ``(1 - phi(z')/phi(z))`` x 100%; Update Ratio =
mean ``|z'/z - 1|`` x 100% over the selected values, and Total Update Ratio the same over all
values (values with ``|z| <= 1e-6`` are left out of both update ratios).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

import memel
from memel.training.objective import compute

from .monosemantic_ratio import mean_ci

MODES = ("original", "naive_a", "naive_b", "rd")

#: The paper's Table 4 (Swin-B, one step at lr 2e-6): Decrease Ratio and Total Update Ratio, %.
PAPER_TABLE4: dict[str, tuple[float, float]] = {
    "original": (0.003, 0.052), "naive_a": (-0.017, 0.118), "naive_b": (-0.044, 0.161), "rd": (0.013, 0.189),
}  # fmt: skip

#: The trained run's inhibition settings the case study keeps (mode, strength and selection are its own).
KEPT = ("top_n", "layout", "forget_steps", "eps", "ms_threshold", "track_every", "kernel")

#: Values this close to 0 are left out of the update ratios (|z'/z - 1| is unbounded there).
TINY = 1e-6


@dataclass
class Ratios:
    decrease_ratio: float
    update_ratio: float
    total_update_ratio: float
    selected: int
    values: int


def phi(values: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """The Monosemantic Scale of ``[samples, neurons]`` values in float64 (as ``Inhibitor.monosemantic_scale``)."""
    from memel.inhibition.statistics import variance_denominator

    return (values.double() - mean.double()).square() / variance_denominator(var, eps)


def ratios(
    z: dict[str, torch.Tensor], z_new: dict[str, torch.Tensor], stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
    eps: float, top_n: int,
) -> Ratios:  # fmt: skip
    """Decrease and update ratios (%) over all modules; ``z``/``z_new`` are ``[samples, neurons]``
    per module, ``stats`` the (mean, var) per module they are judged against."""
    decrease, update, total = [], [], []
    for name, before in z.items():
        after = z_new[name].double()
        before = before.double()
        mean, var = stats[name]
        phi_before, phi_after = phi(before, mean, var, eps), phi(after, mean, var, eps)
        chosen = phi_before.topk(top_n, dim=1).indices
        pb, pa = phi_before.gather(1, chosen), phi_after.gather(1, chosen)
        zb, za = before.gather(1, chosen), after.gather(1, chosen)
        positive = pb > 0
        decrease.append((1 - pa[positive] / pb[positive]).flatten())
        big = zb.abs() > TINY
        update.append((za[big] / zb[big] - 1).abs().flatten())
        every = before.abs() > TINY
        total.append((after[every] / before[every] - 1).abs().flatten())
    dec, upd, tot = torch.cat(decrease), torch.cat(update), torch.cat(total)
    values = sum(int(t.numel()) for t in z.values())
    return Ratios(
        float(dec.mean()) * 100 if dec.numel() else float("nan"), float(upd.mean()) * 100 if upd.numel() else float("nan"),
        float(tot.mean()) * 100 if tot.numel() else float("nan"), int(dec.numel()), values,
    )  # fmt: skip


def _capture(inserted: dict[str, memel.Inhibitor], store: dict[str, torch.Tensor], layout: str) -> list[Any]:
    def make(name: str):
        def hook(_module: nn.Module, args: Any) -> None:
            value = args[0].detach()
            store[name] = (
                value.reshape(value.shape[0], -1) if layout == "element" else value.reshape(-1, value.shape[-1])
            ).clone()

        return hook

    return [module.register_forward_pre_hook(make(name)) for name, module in inserted.items()]


def _forward_capturing(
    model: torch.nn.Module, inserted: dict[str, Any], batch: Any, kind: str, device: torch.device, layout: str,
    into: dict[str, torch.Tensor],
) -> None:  # fmt: skip
    """One eval-mode forward of ``batch`` recording each inserted module's input in ``into``."""
    handles = _capture(inserted, into, layout)
    model.eval()
    with torch.no_grad():
        compute(model, batch, kind, device)
    for handle in handles:
        handle.remove()


def one_step(
    model: nn.Module, targets: list[str], states: dict[str, dict[str, torch.Tensor]], config: dict[str, Any],
    mode: str, batch: Any, kind: str, lr: float, optimizer: str = "sgd", strength: float = 1.0,
) -> Ratios:  # fmt: skip
    """The case study for one mode on ``model`` (modified in place: pass a copy)."""
    settings = {key: config[key] for key in KEPT if key in config}
    if config.get("select", "top_n") != "top_n":
        settings["top_n"] = 1  # a run trained with threshold selection: the case study selects the top-1 per sample
    settings |= {"mode": mode, "late_start": 0, "stats_update": "call", "strength": strength if mode == "rd" else 1.0}
    inserted = memel.inhibit(model, targets, memel.InhibitionConfig(**settings))
    for name, module in inserted.items():
        if name in states:
            module.load_state_dict(states[name])
    layout = inserted[next(iter(inserted))].config.layout
    stats = {}
    for name, module in inserted.items():
        if module.initialized:
            found = module.statistics()
            stats[name] = (found["mean"].reshape(-1).clone(), found["var"].reshape(-1).clone())
    device = next(model.parameters()).device
    before: dict[str, torch.Tensor] = {}
    after: dict[str, torch.Tensor] = {}
    _forward_capturing(model, inserted, batch, kind, device, layout, before)
    if not stats:  # no trained statistics: the step's forward starts them, phi is judged after it
        raise ValueError("the Inhibitors have no statistics: load trained Inhibitor states first")
    params = [p for p in model.parameters() if p.requires_grad]
    step = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    step.zero_grad(set_to_none=True)
    compute(model, batch, kind, device).loss.backward()
    step.step()
    _forward_capturing(model, inserted, batch, kind, device, layout, after)
    memel.remove(model)
    eps = next(iter(inserted.values())).config.eps
    top_n = next(iter(inserted.values())).config.top_n
    return ratios({n: before[n] for n in stats}, {n: after[n] for n in stats}, stats, eps, top_n)


def case_study(
    model: nn.Module, targets: list[str], states: dict[str, dict[str, torch.Tensor]], config: dict[str, Any],
    batches: dict[int, Any], kind: str, lr: float, optimizer: str = "sgd", modes: tuple[str, ...] = MODES,
    strength: float = 1.0,
) -> pd.DataFrame:  # fmt: skip
    """One row per mode and seed (``batches`` maps seed -> its fixed batch); ``model`` is left unchanged."""
    rows = []
    for seed, batch in batches.items():
        for mode in modes:
            torch.manual_seed(seed)
            result = one_step(copy.deepcopy(model), targets, states, config, mode, batch, kind, lr, optimizer, strength)
            rows.append({"mode": mode, "seed": seed, **vars(result)})
    return pd.DataFrame(rows)


def summarize_case_study(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Per mode: mean and 95% CI over seeds of each ratio, the paper's values and the signs."""
    rows = []
    for mode in [m for m in MODES if m in set(per_seed["mode"])] + sorted(set(per_seed["mode"]) - set(MODES)):
        part = per_seed[per_seed["mode"] == mode]
        row: dict[str, Any] = {"mode": mode, "seeds": len(part)}
        for column in ("decrease_ratio", "update_ratio", "total_update_ratio"):
            mean, std, low, high = mean_ci(part[column])
            row |= {f"{column}": mean, f"{column}_std": std, f"{column}_ci_low": low, f"{column}_ci_high": high}
        paper = PAPER_TABLE4.get(mode, (float("nan"), float("nan")))
        row["paper_decrease_ratio"], row["paper_total_update_ratio"] = paper
        row["sign"] = sign(row["decrease_ratio"], row["decrease_ratio_ci_low"], row["decrease_ratio_ci_high"])
        row["paper_sign"] = sign(paper[0])
        # the same batch and weights under original: the mode's own effect, without the step's common drift
        if "original" in set(per_seed["mode"]):
            base = per_seed[per_seed["mode"] == "original"].set_index("seed")["decrease_ratio"]
            difference = part.set_index("seed")["decrease_ratio"] - base.reindex(part["seed"]).to_numpy()
            mean, _, low, high = mean_ci(difference)
            row |= {"vs_original": mean, "vs_original_ci_low": low, "vs_original_ci_high": high}
            row["vs_original_sign"] = "0" if mode == "original" else sign(mean, low, high)
            row["paper_vs_original"] = paper[0] - PAPER_TABLE4["original"][0]
            row["paper_vs_original_sign"] = "0" if mode == "original" else sign(row["paper_vs_original"])
        rows.append(row)
    return pd.DataFrame(rows)


def sign(mean: float, low: float | None = None, high: float | None = None) -> str:
    """``+`` or ``-`` by the mean's sign; ``(+)``/``(-)`` when the interval includes 0."""
    if math.isnan(mean):
        return "?"
    text = "+" if mean > 0 else "-" if mean < 0 else "0"
    if low is not None and high is not None and not (math.isnan(low) or math.isnan(high)) and low <= 0 <= high:
        return f"({text})"
    return text


def member_case_study(
    trained: Any, seeds: list[int], lr: float, optimizer: str = "sgd", batch_size: int | None = None,
    modes: tuple[str, ...] = MODES, strength: float = 1.0,
) -> pd.DataFrame:  # fmt: skip
    """:func:`case_study` on a rebuilt member: seed ``s``'s batch is the first training batch of its data shuffled with seed ``s``."""
    from memel.data import build

    spec = trained.spec
    size = batch_size or spec.train.micro_batch_size
    batches = {seed: next(iter(build({**spec.data, "batch_size": size, "seed": seed, "split": "train"}))) for seed in seeds}
    config = (spec.inhibition or memel.InhibitionConfig()).model_dump()
    return case_study(
        trained.model, trained.targets, trained.inhibition, config, batches, trained.kind, lr, optimizer, modes, strength
    )
