"""Balanced MSE / MAE (B-MSE, B-MAE) of precipitation nowcasts (Shi et al. 2017, HKO-7).

Pixel values p in [0, 1] are radar reflectivity: ``dBZ = 70 p - 10``. Rain rate R (mm/h)
follows from a Z-R relation ``Z = 10 ** (dBZ / 10) = a * R ** b``. Each pixel is weighted by
the rain rate of the *target*: w = 1, 2, 5, 10, 30 for R < 2, [2, 5), [5, 10), [10, 30), >= 30.

Defaults use Marshall-Palmer (a=200, b=1.6). The HKO-7 reference code
(``nowcasting/hko_evaluation.py``) uses a=58.53, b=1.56 (``HKO7_ZR``); pass
``zr=HKO7_ZR`` to reproduce its thresholds exactly.

Normalisation (``reduction``):
    ``"sum"`` (default): sum over frames and pixels (C, H, W) of ``w * err``, mean over the batch.
    ``"frame_mean"``: sum over pixels, mean over frames and batch (the figure HKO-7 reports;
        equals ``"sum" / T``).
    ``"per_frame"``: a [T] tensor, sum over pixels and mean over the batch for each lead time.
    ``"none"``: the weighted errors themselves, shape [B, T, C, H, W].
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from memel.errors import ConfigError

from .config import InputError

Reduction = Literal["sum", "frame_mean", "per_frame", "none"]
REDUCTIONS: tuple[str, ...] = ("sum", "frame_mean", "per_frame", "none")

#: Marshall-Palmer Z-R coefficients (a, b).
MARSHALL_PALMER: tuple[float, float] = (200.0, 1.6)
#: Z-R coefficients of the HKO-7 reference evaluation code.
HKO7_ZR: tuple[float, float] = (58.53, 1.56)
#: Rain-rate thresholds (mm/h) and the weight of pixels at or above each (below the first: 1).
RAIN_THRESHOLDS: tuple[float, ...] = (2.0, 5.0, 10.0, 30.0)
WEIGHTS: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0)


def pixel_to_dbz(pixels: torch.Tensor) -> torch.Tensor:
    """``dBZ = 70 p - 10``."""
    return pixels * 70.0 - 10.0


def pixel_to_rain_rate(pixels: torch.Tensor, zr: tuple[float, float] = MARSHALL_PALMER) -> torch.Tensor:
    """Rain rate R (mm/h) from ``10 ** (dBZ / 10) = a * R ** b``."""
    a, b = zr
    return torch.pow(10.0, (pixel_to_dbz(pixels) - 10.0 * math.log10(a)) / (10.0 * b))


def rain_rate_to_pixel(rate: float, zr: tuple[float, float] = MARSHALL_PALMER) -> float:
    """The pixel value of rain rate ``rate`` (mm/h)."""
    a, b = zr
    dbz = 10.0 * math.log10(a) + 10.0 * b * math.log10(rate)
    return (dbz + 10.0) / 70.0


def balancing_weights(target: torch.Tensor, zr: tuple[float, float] = MARSHALL_PALMER) -> torch.Tensor:
    """Per-pixel weights from the target's rain rate (thresholds compared in pixel space)."""
    weights = torch.full_like(target, WEIGHTS[0])
    for threshold, low, high in zip(RAIN_THRESHOLDS, WEIGHTS, WEIGHTS[1:]):
        weights = weights + (high - low) * (target >= rain_rate_to_pixel(threshold, zr)).to(target.dtype)
    return weights


def _balanced(
    error: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    reduction: str,
    zr: tuple[float, float],
) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction: {reduction!r} is not known; allowed: {', '.join(REDUCTIONS)}")
    if pred.shape != target.shape or pred.dim() != 5:
        raise InputError(
            f"pred and target: expected equal shapes [batch, T, C, H, W], got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    weighted = balancing_weights(target, zr) * error
    if mask is not None:
        weighted = weighted * mask.to(weighted.dtype)
    if reduction == "none":
        return weighted
    per_frame = weighted.sum(dim=(2, 3, 4)).mean(dim=0)
    if reduction == "per_frame":
        return per_frame
    return per_frame.sum() if reduction == "sum" else per_frame.mean()


def b_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "sum",
    zr: tuple[float, float] = MARSHALL_PALMER,
) -> torch.Tensor:
    """Balanced MSE of ``pred`` against ``target`` [B, T, C, H, W] (see the module docstring)."""
    return _balanced((pred - target) ** 2, pred, target, mask, reduction, zr)


def b_mae(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: Reduction = "sum",
    zr: tuple[float, float] = MARSHALL_PALMER,
) -> torch.Tensor:
    """Balanced MAE of ``pred`` against ``target`` [B, T, C, H, W] (see the module docstring)."""
    return _balanced((pred - target).abs(), pred, target, mask, reduction, zr)
