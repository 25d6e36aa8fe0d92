"""Forward+backward time of the Inhibitor relative to a plain ``h * 1.0`` on the same tensor.

Both are timed interleaved in one process (baseline, module, baseline, module, ...) so that
machine drift cancels in the ratio; the median ratio is reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from memel.inhibition import InhibitionConfig, Inhibitor


@dataclass
class InhibitionBenchRow:
    kernel: str
    layout: str
    top_n: int
    mode: str
    module_ms: float
    baseline_ms: float
    ratio: float
    best_ratio: float


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, grad: torch.Tensor) -> float:
    h.grad = None
    start = time.perf_counter()
    fn(h).backward(grad)
    return time.perf_counter() - start


def bench_inhibition(
    shape: tuple[int, ...] = (8, 512, 4096),
    layouts: Iterable[str] = ("channel", "element"),
    top_ns: Iterable[int] = (1, 10, 100),
    mode: str = "rd",
    repeats: int = 7,
    track_every: int = 1,
    kernels: Iterable[str] = ("native", "compiled", "eager"),
    seed: int = 0,
) -> list[InhibitionBenchRow]:
    """Per layout and top_n: median of the paired ratios (module fwd+bwd) / (h*1.0 fwd+bwd), and
    the ratio of the best times (large CPU allocations make both sides noisy: page faults
    come and go with the allocator's state), statistics update and tracking included."""
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, generator=generator).requires_grad_(True)
    grad = torch.randn(*shape, generator=generator)
    rows = []
    for kernel, layout, top_n in ((k, l, n) for k in kernels for l in layouts for n in top_ns):
        config = InhibitionConfig(
            mode=mode, top_n=top_n, layout=layout, forget_steps=2, late_start=2, track_every=track_every, kernel=kernel
        )
        module = Inhibitor(config).train()
        for _ in range(config.late_start + 1):  # history past late start: values are really inhibited
            _fwd_bwd(module, h, grad)
        _fwd_bwd(lambda x: x * 1.0, h, grad)
        ratios, module_times, base_times = [], [], []
        for _ in range(repeats):
            base = _fwd_bwd(lambda x: x * 1.0, h, grad)
            timed = _fwd_bwd(module, h, grad)
            base_times.append(base)
            module_times.append(timed)
            ratios.append(timed / base)
        rows.append(
            InhibitionBenchRow(
                kernel,
                layout,
                top_n,
                mode,
                statistics.median(module_times) * 1e3,
                statistics.median(base_times) * 1e3,
                statistics.median(ratios),
                min(module_times) / min(base_times),
            )
        )
    return rows
