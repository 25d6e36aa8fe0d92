"""The hot path: one training call's Monosemantic Scale, selection, moments and the RD op.

The Monosemantic Scale (MS) of value z of neuron j is phi = (z - mu_j)^2 / denom_j, so with
a_j = 1/sqrt(denom_j) the ranking of phi within a sample equals the ranking of
|z*a_j - mu_j*a_j|, which one fused multiply-add produces. The batch's own moments come from
one ``var_mean`` pass; the per-neuron sum of phi follows from those moments for free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .statistics import Moments, batch_moments


@dataclass
class CallAnalysis:
    """What one training call measured, per neuron unless said otherwise."""

    moments: Moments
    #: [samples, top_n] neuron indices selected in each sample (None without history).
    selected: torch.Tensor | None = None
    #: Sum of phi over this call's samples and the number of samples it covers.
    ms_sum: torch.Tensor | None = None
    #: Max phi and count of samples with phi > threshold (None on untracked calls).
    ms_max: torch.Tensor | None = None
    above: torch.Tensor | None = None


def analyse_call(
    values: torch.Tensor,
    mean: torch.Tensor | None,
    inv_sqrt_denominator: torch.Tensor | None,
    top_n: int,
    sqrt_threshold: float,
    track: bool,
) -> CallAnalysis:
    """Measure a [samples, neurons] call against the pre-call history (mean, 1/sqrt(denom)).

    Without history (``mean`` is None) only the batch moments are computed.
    """
    moments = batch_moments(values)
    if mean is None or inv_sqrt_denominator is None:
        return CallAnalysis(moments)
    work = values if values.dtype in (torch.float32, torch.float64) else values.float()
    scale = inv_sqrt_denominator.to(work.dtype)
    offset = (mean.double() * inv_sqrt_denominator).to(work.dtype)
    scaled = torch.addcmul(offset.neg(), work, scale).abs_()  # sqrt(phi)
    if top_n == 1:
        selected = scaled.argmax(dim=1, keepdim=True)
    else:
        selected = scaled.topk(top_n, dim=1, sorted=False).indices
    # sum over samples of (z - mu)^2 = M2_batch + b*(mean_batch - mu)^2, exact from the moments.
    deviation = moments.mean - mean.double()
    squared = moments.m2 + moments.count * deviation * deviation
    ms_sum = squared * inv_sqrt_denominator.double().square()
    analysis = CallAnalysis(moments, selected, ms_sum)
    if track:
        analysis.ms_max = scaled.amax(dim=0).double().square()
        analysis.above = (scaled > sqrt_threshold).sum(dim=0, dtype=torch.float64)
    return analysis


def flat_selection(selected: torch.Tensor, neurons: int) -> torch.Tensor:
    """Flat indices into a contiguous [samples, neurons] tensor for per-row selections."""
    rows = torch.arange(selected.shape[0], device=selected.device).unsqueeze(1) * neurons
    return (rows + selected).reshape(-1)


class ReverseDeactivation(torch.autograd.Function):
    """z' = -D*z + (mu + D*z).detach() at the selected values; identity elsewhere.

    Forward: selected values become the neuron mean. Backward: their gradient is multiplied
    by -D (D=0: no gradient, naive (a); D=-1: unchanged, naive (b)); all others pass through.
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, flat_index: torch.Tensor, replacement: torch.Tensor, strength: float):  # type: ignore[override]
        output = values.contiguous().clone() if values.is_contiguous() else values.contiguous()
        output.view(-1).index_copy_(0, flat_index, replacement.to(output.dtype))
        ctx.save_for_backward(flat_index)
        ctx.strength = strength
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        (flat_index,) = ctx.saved_tensors
        strength = ctx.strength
        if strength == -1.0:
            return grad_output, None, None, None
        grad = grad_output.contiguous().clone() if grad_output.is_contiguous() else grad_output.contiguous()
        flat = grad.view(-1)
        if strength == 0.0:
            flat.index_fill_(0, flat_index, 0.0)
        else:
            flat.index_copy_(0, flat_index, flat.index_select(0, flat_index) * (-strength))
        return grad, None, None, None
