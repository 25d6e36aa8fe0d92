"""Per-neuron running statistics: batch moments and the paper's exact merge (Lemma 3.2).

Everything here works on neuron vectors ([N]) in float64: the hot path produces per-neuron
sums of d = z - mu and d^2 about the history mean, and these functions turn them into a
batch's moments and merge those into the history.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Moments:
    """Count, mean and sum of squared deviations (M2) of a set of samples, per neuron."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def from_shifted_sums(
        cls, count: torch.Tensor, sum_shifted: torch.Tensor, sumsq_shifted: torch.Tensor, shift: torch.Tensor
    ) -> Moments:
        """Moments from sums of (x - shift) and (x - shift)^2 (what an all-reduce adds up)."""
        safe = count.clamp_min(1)
        delta = sum_shifted / safe
        m2 = (sumsq_shifted - sum_shifted * delta).clamp_min(0)
        return cls(count.clone(), torch.where(count > 0, shift + delta, torch.zeros_like(shift)), m2)


def merge_history(
    mean: torch.Tensor,
    var: torch.Tensor,
    count: torch.Tensor,
    batches: int,
    batch: Moments,
    forget_steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge one (global) batch into the history with Lemma 3.2 and the forget step.

    ``var`` is the unbiased sample variance. While the history holds fewer than
    ``forget_steps`` batches its weight is its sample count m; from then on it is capped at
    ``forget_steps`` batches of the incoming size (m = n_f * b), which is exactly the paper's
    Algorithm 1: mu <- (n_f*mu + mu_b)/(n_f+1) and
    nu <- n_f*(mu-mu_b)^2/((n_f+1-1/b)*(n_f+1)) + (nu_b + (n_f-1/b)*nu)/(n_f+1-1/b).
    Returns the new (mean, var, count); count is the true number of samples seen.
    """
    mu = mean.double()
    nu = var.double()
    b = batch.count
    history = count.double()
    if batches >= forget_steps:
        history = torch.where(history > 0, forget_steps * b, history)
    m = history
    total = m + b
    has_batch = b > 0
    first = has_batch & (m == 0)
    merged = has_batch & (m > 0)

    safe_total = total.clamp_min(1)
    dof = (total - 1).clamp_min(1)
    delta = mu - batch.mean
    new_mu = (m * mu + b * batch.mean) / safe_total
    new_nu = m * b * delta * delta / (dof * safe_total) + (batch.m2 + (m - 1) * nu) / dof
    first_nu = batch.m2 / (b - 1).clamp_min(1)

    out_mu = torch.where(merged, new_mu, torch.where(first, batch.mean, mu))
    out_nu = torch.where(merged, new_nu, torch.where(first, first_nu, nu)).clamp_min(0)
    out_count = count + b.to(count.dtype)
    return out_mu.to(mean.dtype), out_nu.to(var.dtype), out_count


def inverse_sqrt_denominator(var: torch.Tensor, eps: float) -> torch.Tensor:
    """1/sqrt(var + eps*mean(var)) in float32 (the MS scale of the hot path): the mean is
    taken in float64, the rest runs in place in float32 (a few passes over the neurons)."""
    compensation = eps * float(var.sum(dtype=torch.float64)) / max(var.numel(), 1)
    scale = var.float().add(compensation)
    return scale.clamp_min_(torch.finfo(torch.float32).tiny).rsqrt_()


def variance_denominator(var: torch.Tensor, eps: float) -> torch.Tensor:
    """var + eps * mean_over_neurons(var), floored so that MS stays finite for constant neurons."""
    denominator = var.double() + eps * var.double().mean()
    return denominator.clamp_min(torch.finfo(torch.float32).tiny)
