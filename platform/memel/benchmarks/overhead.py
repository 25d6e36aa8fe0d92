"""Training-step overhead of inhibition, measured side by side in one process.

Variants: ``none``, a mode (``original``, ``rd``, ``l2e``, ...), optionally ``@threshold``
(one moving threshold per module instead of per-sample top-n), ``/eager`` or ``/compiled``
(kernel), ``+parquet`` (a snapshot of every module written at every step). ``l2e`` adds
``memel.auxiliary_loss(model)`` to the loss.

Every variant is the same model (same seed) trained on the same batches; one optimizer
step of each is timed in turn (none, original, rd, ..., none, original, rd, ...), so drift
of the machine cancels in the per-round ratios, whose medians are reported against the
model without any module. Each variant's *module share* is steadier: the time spent inside
its Inhibitors' forwards and their backward functions in a step, over that step's time (a
lower bound of the overhead: what the autograd engine does around those functions is not
included, e.g. adding l2e's sparse gradient where it could not be added in place).

On a CUDA device every step ends with a synchronize before its clock stops, and the module
share is the stream time between CUDA events recorded on entry and exit of those functions.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import memel
from memel.inhibition.kernels import LogMSLoss, ReverseDeactivation
from memel.models import build, preset_targets

from .device import bench_device, synchronize


@dataclass
class OverheadRow:
    variant: str
    step_ms: float
    ratio: float
    module_share: float = 0.0


class ModuleClock:
    """Seconds spent inside Inhibitor forwards (hooks) and their autograd backward functions.

    On CPU the host clock; on CUDA (``device``) the stream time between events recorded on
    entry and exit, read by :meth:`total` once the device is synchronized.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = 0.0
        self._started: dict[int, object] = {}
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _add_since(self, started: object) -> None:
        if self.cuda:
            self._events.append((started, self._now()))  # type: ignore[arg-type]
        else:
            self.seconds += time.perf_counter() - started  # type: ignore[operator]

    def reset(self) -> None:
        self.seconds = 0.0
        self._events.clear()

    def total(self) -> float:
        """Seconds counted since :meth:`reset` (on CUDA: call after synchronizing the device)."""
        return self.seconds + sum(start.elapsed_time(end) for start, end in self._events) / 1e3

    def attach(self, model: torch.nn.Module) -> None:
        for module in memel.inhibitors(model).values():
            module.register_forward_pre_hook(self._pre)
            module.register_forward_hook(self._post)

    def _pre(self, module: torch.nn.Module, args: object) -> None:
        self._started[id(module)] = self._now()

    def _post(self, module: torch.nn.Module, args: object, output: object) -> None:
        self._add_since(self._started.pop(id(module)))

    @contextlib.contextmanager
    def timing_backwards(self) -> Iterator[None]:
        """Time every ReverseDeactivation / LogMSLoss backward while inside."""
        originals = {cls: cls.__dict__["backward"] for cls in (ReverseDeactivation, LogMSLoss)}

        def timed(function: Callable[..., object]) -> staticmethod:
            def backward(ctx: object, *grads: object) -> object:
                start = self._now()
                try:
                    return function(ctx, *grads)
                finally:
                    self._add_since(start)

            return staticmethod(backward)

        try:
            for cls, original in originals.items():
                cls.backward = timed(original.__func__)  # type: ignore[method-assign]
            yield
        finally:
            for cls, original in originals.items():
                cls.backward = original  # type: ignore[method-assign]


def _variant(
    model_name: str,
    preset: str,
    variant: str,
    sink_root: str | None,
    closers: list[Callable[[], object]],
    device: torch.device,
) -> tuple[torch.nn.Module, Callable[[int], None]]:
    torch.manual_seed(0)
    model = build(model_name).to(device)
    after_step: Callable[[int], None] = lambda step: None  # noqa: E731
    if variant != "none":
        mode, _, kernel = variant.partition("/")
        mode, _, select = mode.partition("@")  # rd@threshold: one moving threshold instead of per-sample top-n
        parquet = mode.endswith("+parquet") or select.endswith("+parquet")
        select = select.removesuffix("+parquet") or "top_n"
        mode = mode.removesuffix("+parquet")
        config = memel.InhibitionConfig(mode=mode, select=select, kernel=kernel or "auto", late_start=1)
        inserted = memel.inhibit(model, preset_targets(model_name, preset), config)
        if parquet and sink_root is not None:
            from memel.stats import ParquetStatsSink, snapshot_table

            sink = ParquetStatsSink(sink_root, "bench")
            closers.append(sink.close)

            def after_step(step: int) -> None:  # a snapshot of every module at every step: the worst case
                for depth, (name, module) in enumerate(inserted.items()):
                    table = snapshot_table(
                        module.snapshot(),
                        run_id="bench",
                        model=model_name,
                        n_params=0,
                        mode="rd",
                        strength=1.0,
                        top_n=1,
                        seed=0,
                        step=step,
                        tokens_seen=0,
                        module=name,
                        depth=depth / max(len(inserted) - 1, 1),
                    )
                    sink.submit(table, module=name, step=step)

    return model, after_step


def bench_overhead(
    model_name: str = "byte-4m",
    preset: str = "mlp",
    batch: int = 16,
    seq: int = 256,
    rounds: int = 7,
    warmup: int = 2,
    variants: tuple[str, ...] = (
        "none",
        "original",
        "rd",
        "rd@threshold",
        "l2e@threshold",
        "l2e",
        "rd/eager",
        "rd+parquet",
    ),
    device: torch.device | str = "cpu",
) -> list[OverheadRow]:
    """Median step time per variant and the median per-round ratio to ``none``, on ``device``
    (``cpu``, ``cuda``, ``cuda:N``)."""
    device = bench_device(device)
    generator = torch.Generator().manual_seed(0)
    vocab = build(model_name, device="meta").config.vocab_size
    data = [torch.randint(0, vocab, (batch, seq + 1), generator=generator).to(device) for _ in range(rounds + warmup)]
    with tempfile.TemporaryDirectory(prefix="memel-bench-") as root:
        runs, closers, clocks = {}, [], {}
        for name in variants:
            model, after = _variant(model_name, preset, name, root, closers, device)
            runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-3), after)
            clocks[name] = ModuleClock(device)
            clocks[name].attach(model)
        times: dict[str, list[float]] = {name: [] for name in variants}
        shares: dict[str, list[float]] = {name: [] for name in variants}
        for index, tokens in enumerate(data):
            for name, (model, optimizer, after) in runs.items():
                clock = clocks[name]
                clock.reset()
                with clock.timing_backwards():
                    synchronize(device)
                    start = time.perf_counter()
                    logits = model(tokens[:, :-1])
                    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + memel.auxiliary_loss(model)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    after(index)
                    synchronize(device)
                    elapsed = time.perf_counter() - start
                if index >= warmup:
                    times[name].append(elapsed)
                    shares[name].append(clock.total() / elapsed)
        for close in closers:  # everything written before the folder goes
            close()
    base = times["none"] if "none" in times else next(iter(times.values()))
    return [
        OverheadRow(
            name,
            statistics.median(t) * 1e3,
            statistics.median(a / b for a, b in zip(t, base)),
            statistics.median(shares[name]),
        )
        for name, t in times.items()
    ]
