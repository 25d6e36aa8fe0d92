"""Synthetic radar-echo sequences for precipitation nowcasting (HKO-7 style).

Each sequence has a few storm cells: Gaussian blobs of rain rate R (mm/h) that move with
a shared steering wind plus their own drift, and grow then decay over their life
(intensity ``R_peak * exp(-((t - t_peak) / tau)^2)``; the radius grows with intensity).
Rain rate is turned into radar reflectivity by the Marshall-Palmer Z-R relation
``Z = 200 * R^1.6`` and into pixels as in HKO-7:

    dBZ   = 10 * log10(200 * R^1.6)
    pixel = clip(round(255 * (dBZ + 10) / 80), 0, 255)

and the loader yields ``pixel / 255`` as float32: inputs ``[B, T_in, 1, H, W]``, targets
``[B, T_out, 1, H, W]``. Sample ``i`` of a split depends only on ``(seed, split, i)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .errors import DataError
from .loader import ShardedLoader
from .splits import SPLITS, check_split

#: Rain rates below this (mm/h) map to pixel 0 anyway; it only avoids log(0).
MIN_RATE = 1e-6


class NowcastBatch(NamedTuple):
    """``inputs`` ``[B, T_in, 1, H, W]`` and ``targets`` ``[B, T_out, 1, H, W]`` in [0, 1]."""

    inputs: torch.Tensor
    targets: torch.Tensor


def rain_to_pixel(rate: np.ndarray) -> np.ndarray:
    """Rain rate (mm/h) -> HKO-7 pixel value 0-255 (float, integer-valued)."""
    dbz = 10.0 * np.log10(200.0 * np.maximum(rate, MIN_RATE) ** 1.6)
    return np.clip(np.round(255.0 * (dbz + 10.0) / 80.0), 0.0, 255.0)


@dataclass(frozen=True)
class Cells:
    """Storm-cell parameters (one entry per cell; positions in pixels, time in frames)."""

    x0: np.ndarray
    y0: np.ndarray
    vx: np.ndarray
    vy: np.ndarray
    peak: np.ndarray
    t_peak: np.ndarray
    tau: np.ndarray
    sigma: np.ndarray

    def rain(self, t: np.ndarray, size: int) -> np.ndarray:
        """Rain rate ``[len(t), size, size]`` at frame times ``t``."""
        t = t[:, None]
        amplitude = self.peak * np.exp(-(((t - self.t_peak) / self.tau) ** 2))  # [T, C]
        sigma = self.sigma * (0.6 + 0.4 * amplitude / self.peak)
        cx, cy = self.x0 + self.vx * t, self.y0 + self.vy * t
        grid = np.arange(size, dtype=np.float64)
        gx = np.exp(-((grid[None, None, :] - cx[..., None]) ** 2) / (2 * sigma[..., None] ** 2))  # [T, C, W]
        gy = np.exp(-((grid[None, None, :] - cy[..., None]) ** 2) / (2 * sigma[..., None] ** 2))  # [T, C, H]
        return np.einsum("tc,tch,tcw->thw", amplitude, gy, gx)


def make_cells(
    rng: np.random.Generator,
    size: int,
    frames: int,
    cells: tuple[int, int],
    speed: tuple[float, float],
) -> Cells:
    """Random cells: a shared wind of ``speed`` px/frame (plus 20% per-cell drift)."""
    n = int(rng.integers(cells[0], cells[1] + 1))
    angle = rng.uniform(0, 2 * np.pi)
    wind = rng.uniform(*speed)
    vx = wind * np.cos(angle) + 0.2 * wind * rng.standard_normal(n)
    vy = wind * np.sin(angle) + 0.2 * wind * rng.standard_normal(n)
    # start cells so that they drift across the grid during the sequence
    x0 = rng.uniform(0.15, 0.85, n) * size - vx * frames / 2
    y0 = rng.uniform(0.15, 0.85, n) * size - vy * frames / 2
    scale = size / 64.0
    return Cells(
        x0=x0,
        y0=y0,
        vx=vx,
        vy=vy,
        peak=np.exp(rng.uniform(np.log(2.0), np.log(100.0), n)),
        t_peak=rng.uniform(-0.25, 1.25, n) * frames,
        tau=rng.uniform(0.4, 1.2, n) * frames,
        sigma=rng.uniform(3.0, 9.0, n) * scale,
    )


class NowcastLoader(ShardedLoader[NowcastBatch]):
    """Sharded, seeded, resumable batches of synthetic radar sequences."""

    def __init__(
        self,
        batch_size: int,
        *,
        size: int = 64,
        input_frames: int = 5,
        output_frames: int = 10,
        samples_per_epoch: int = 1024,
        cells: tuple[int, int] = (2, 6),
        speed: tuple[float, float] = (0.5, 2.5),
        split: str = "train",
        **loader: object,
    ) -> None:
        super().__init__(batch_size, **loader)  # type: ignore[arg-type]
        check_split(split)
        for field, value in (
            ("size", size),
            ("input_frames", input_frames),
            ("output_frames", output_frames),
            ("samples_per_epoch", samples_per_epoch),
        ):
            if value < 1:
                raise DataError(f"{field}: got {value!r}; must be an integer >= 1")
        self.size, self.input_frames, self.output_frames = size, input_frames, output_frames
        self.samples_per_epoch = samples_per_epoch
        self.cells, self.speed = cells, speed
        self.split_id = SPLITS.index(split)

    def num_examples(self) -> int:
        return self.samples_per_epoch

    def cells_of(self, index: int) -> Cells:
        """The storm cells of sample ``index`` (deterministic)."""
        rng = np.random.default_rng([self.seed, self.split_id, index])
        return make_cells(rng, self.size, self.input_frames + self.output_frames, self.cells, self.speed)

    def sample(self, index: int) -> np.ndarray:
        """Frames ``[T_in + T_out, 1, H, W]`` of sample ``index`` as pixel/255 float32."""
        frames = self.input_frames + self.output_frames
        rain = self.cells_of(index).rain(np.arange(frames, dtype=np.float64), self.size)
        return (rain_to_pixel(rain) / 255.0).astype(np.float32)[:, None]

    def fetch(self, indices: np.ndarray) -> NowcastBatch:
        frames = torch.from_numpy(np.stack([self.sample(int(i)) for i in indices]))
        return NowcastBatch(frames[:, : self.input_frames].contiguous(), frames[:, self.input_frames :].contiguous())
