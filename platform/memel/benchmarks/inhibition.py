"""Forward+backward time of the Inhibitor relative to a plain ``h * 1.0`` on the same tensor.

All are timed interleaved in one process (baseline, warm baseline, module, ...) so that
machine drift cancels in the ratios; the median ratios are reported. Two baselines:
``h * 1.0`` (what the issue defines: fresh output and gradient tensors, whose page faults are
most of their cost on CPU) and a warm copy (one read and one write each way into reused
buffers, the data movement a module with reused buffers cannot go below; CPU only, where the
native kernel is built). On a CUDA device each timed call ends with a synchronize.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from memel.errors import ConfigError
from memel.inhibition import InhibitionConfig, Inhibitor
from memel.inhibition.kernels import BufferSlot

from .device import bench_device, synchronize


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
    warm_ms: float | None = None
    warm_ratio: float | None = None


class WarmCopy(torch.autograd.Function):
    """Identity whose forward output and backward gradient are copies written into reused
    buffers (the native kernel's buffer reuse): the minimum data movement of a module that
    writes a new activation, without the page faults of fresh memory."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, slots: tuple[BufferSlot, BufferSlot]):  # type: ignore[override]
        from memel.inhibition.native import native_reversed_gradient

        ctx.slots = slots
        out, slots[0].tensor = native_reversed_gradient(h.detach(), _NO_INDEX, 1.0, slots[0].tensor)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        from memel.inhibition.native import native_reversed_gradient

        out, ctx.slots[1].tensor = native_reversed_gradient(grad, _NO_INDEX, 1.0, ctx.slots[1].tensor)
        return out, None


_NO_INDEX = torch.zeros(0, dtype=torch.int64)


def warm_copy_available() -> bool:
    from memel.inhibition import native

    return native.available()


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, grad: torch.Tensor) -> float:
    h.grad = None
    synchronize(h.device)
    start = time.perf_counter()
    fn(h).backward(grad)
    synchronize(h.device)
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
    reuse_buffers: bool = True,
    device: torch.device | str = "cpu",
) -> list[InhibitionBenchRow]:
    """Per layout and top_n: median of the paired ratios (module fwd+bwd) / (h*1.0 fwd+bwd), and
    the ratio of the best times (large CPU allocations make both sides noisy: page faults
    come and go with the allocator's state), statistics update and tracking included; where
    the native kernel is built, also the median ratio to the warm copy (``WarmCopy``).
    ``device``: ``cpu``, ``cuda`` or ``cuda:N`` (the native kernel and the warm copy are CPU only)."""
    device = bench_device(device)
    kernels = tuple(kernels)
    if device.type != "cpu" and "native" in kernels:
        raise ConfigError(f"kernel: 'native' runs on CPU tensors only; on device {str(device)!r} use eager or compiled")
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, generator=generator).to(device).requires_grad_(True)
    grad = torch.randn(*shape, generator=generator).to(device)
    slots = (BufferSlot(), BufferSlot())
    warm = (lambda x: WarmCopy.apply(x, slots)) if device.type == "cpu" and warm_copy_available() else None
    rows = []
    for kernel, layout, top_n in ((k, lay, n) for k in kernels for lay in layouts for n in top_ns):
        config = InhibitionConfig(
            mode=mode,
            top_n=top_n,
            layout=layout,
            forget_steps=2,
            late_start=2,
            track_every=track_every,
            kernel=kernel,
            reuse_buffers=reuse_buffers,
        )
        module = Inhibitor(config).to(device).train()
        for _ in range(config.late_start + 1):  # history past late start: values are really inhibited
            _fwd_bwd(module, h, grad)
        _fwd_bwd(lambda x: x * 1.0, h, grad)
        if warm is not None:
            _fwd_bwd(warm, h, grad)
        ratios, warm_ratios, module_times, base_times, warm_times = [], [], [], [], []
        for _ in range(repeats):
            base = _fwd_bwd(lambda x: x * 1.0, h, grad)
            if warm is not None:
                warm_times.append(_fwd_bwd(warm, h, grad))
            timed = _fwd_bwd(module, h, grad)
            base_times.append(base)
            module_times.append(timed)
            ratios.append(timed / base)
            if warm is not None:
                warm_ratios.append(timed / warm_times[-1])
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
                statistics.median(warm_times) * 1e3 if warm_times else None,
                statistics.median(warm_ratios) if warm_ratios else None,
            )
        )
    return rows
