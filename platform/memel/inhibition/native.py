"""``kernel="native"``: the hot path as one fused C++ pass over the values (CPU).

``native_kernel.cpp`` computes everything ``kernels.eager_measure`` does (per-neuron sums of
d and d^2 in double, max |d*a| and the count above threshold, each sample's top-n or, for
threshold selection, the row-major flat indices of the values with |d*a| >= sqrt(tau), and
the copy) in a single read of the [samples, neurons] values, parallel over rows when there
are many samples (channel layout) and over neurons otherwise (element layout).
``native_fold`` runs the same pass and merges the call into the history in it (the local
path of ``Inhibitor._fold``). Copies and gradients can be written into reused buffers
(``reuse``/``BufferSlot``): a buffer is reused only once nothing but its slot refers to it.

Build: compiled on first use with ``torch.utils.cpp_extension.load`` (``-O3 -fopenmp``; the
hot loop is cloned for x86-64-v4/v3/baseline and picked at run time, so one build works on
any x86-64 CPU) and cached in torch's extensions directory (``$TORCH_EXTENSIONS_DIR``,
default ``~/.cache/torch_extensions``), so later processes only load it; a changed source
rebuilds it. One process builds at a time, and a lock left by a killed build is broken
(:mod:`memel.inhibition.native_build`). If it cannot be built (no C++ compiler, no ninja, ...) a warning is issued once
and every call falls back to the eager kernel: training never fails because of it.

The copy (the caller's output) is allocated by the kernel. With ``MEMEL_NATIVE_HUGEPAGES=1``
copies of 4 MiB and more are backed by transparent huge pages where Linux allows it
(``madvise``): page faults are most of the cost of writing a fresh buffer, so this is
faster on average, but where THP defragmentation is synchronous for madvised memory a fault
can stall, so it is off by default.

Supported: CPU tensors of float32, bfloat16 or float16 (read natively, converted per value to
float32 exactly like ``values.float()``; the copy keeps the input dtype). Anything else (other
devices, float64) runs the eager kernel, with a one-time warning.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .native_build import build_directory, exclusive_build

SOURCE = Path(__file__).with_name("native_kernel.cpp")
EXTENSION_NAME = "memel_inhibition_native"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_lock = threading.Lock()
_module: Any = None
_failed: str | None = None
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


class FoldResult(NamedTuple):
    """What ``native_fold`` returns."""

    neuron_index: torch.Tensor  # the neuron of every selected value
    flat_index: torch.Tensor  # its flat index into [samples, neurons] (row-major)
    copy: torch.Tensor | None  # the copy to modify (lent from ``buffer``), when asked for
    buffer: torch.Tensor | None  # the copy's buffer: offer it as ``reuse`` next time
    var_sum: float  # sum of the new history variance
    merged: int  # neurons whose statistics took the call
    terms: tuple[torch.Tensor, torch.Tensor] | None  # l2e: (sum of the loss terms, gradient factors)


def load() -> Any:
    """The compiled extension, building it on first use; None if it cannot be built."""
    global _module, _failed
    if _module is not None:
        return _module
    with _lock:
        if _module is None and _failed is None:
            try:
                from torch.utils.cpp_extension import load as load_extension

                folder = build_directory(EXTENSION_NAME, SOURCE)
                with exclusive_build(folder):  # waits for a live build, breaks a dead one's lock
                    _module = load_extension(
                        name=EXTENSION_NAME,
                        sources=[str(SOURCE)],
                        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
                        extra_ldflags=["-fopenmp"],
                        build_directory=str(folder),
                        verbose=False,
                    )
            except Exception as error:  # noqa: BLE001  (no compiler, no ninja, a failed build: never crash training)
                _failed = f"{type(error).__name__}: {error}".strip()
    if _module is None:
        _warn_once(
            "build",
            f"memel: the native inhibition kernel could not be built ({_failed[:2000] if _failed else 'unknown'}); "
            "falling back to the eager kernel",
        )
    return _module


def available() -> bool:
    """Whether the native kernel is (or can be) built and loaded."""
    return load() is not None


def native_measure(
    values: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    top_n: int,
    sqrt_threshold: float,
    track: bool,
    copy: bool,
    threads: int = 0,
    select_threshold: float | None = None,
    sorted_rows: bool = False,
) -> tuple | None:
    """``eager_measure``'s tuple from one fused pass, or None where the caller must use eager
    (kernel unavailable, unsupported device/dtype, or shapes eager itself must judge).

    ``select_threshold`` (sqrt(tau), compared in float32): select every value with
    |d*a| >= it (NaN too) instead of each sample's top-n; ``selected`` is then 1-D flat indices.
    ``sorted_rows``: each sample's top-n in increasing neuron order (else in no set order).

    ``threads``: how many parallel tasks to split the work into (0: ``torch.get_num_threads()``);
    the kernel runs row-parallel when there are at least 64 samples per task, else
    column-parallel."""
    if values.device.type != "cpu" or values.dtype not in SUPPORTED_DTYPES:
        _warn_once(
            f"unsupported:{values.device.type}:{values.dtype}",
            f"memel: the native inhibition kernel supports CPU float32/bfloat16/float16 values only, got "
            f"{values.dtype} on {values.device.type}; using the eager kernel",
        )
        return None
    if (
        values.dim() != 2
        or values.numel() == 0
        or not 1 <= top_n <= values.shape[1]
        or values.shape[1] >= 2**31
        or (select_threshold is not None and not select_threshold >= 0)
    ):
        return None  # eager handles (or raises on) these
    module = load()
    if module is None:
        return None
    try:
        return tuple(
            module.measure(
                values.contiguous(),
                mean,
                scale,
                int(top_n),
                float(sqrt_threshold),
                bool(track),
                bool(copy),
                int(threads),
                -1.0 if select_threshold is None else float(select_threshold),
                bool(sorted_rows),
            )
        )
    except Exception as error:  # noqa: BLE001  (an unforeseen input: never crash training, use eager for it)
        _warn_once(
            f"error:{type(error).__name__}",
            f"memel: the native inhibition kernel failed ({type(error).__name__}: {error}); using the eager kernel",
        )
        return None


class FoldCall(NamedTuple):
    """The arguments of one ``native_fold`` call, by name.

    ``values`` [samples, neurons] are judged against the history (``mean``, ``var``,
    ``count``: the module's buffers, updated in place) with ``compensation`` = eps * mean(var);
    ``prev_mean`` receives the pre-call mean. ``top_n`` values per sample are selected (or,
    with ``select_threshold`` = sqrt(tau), every value with |d*a| >= it); ``copy``: return a
    copy of the values to modify; ``track``: update the window's max MS and count above
    ``sqrt_threshold``. ``capped``/``forget_steps``: the history's forget step.

    ``window_rows``: the rows of the window for the MS sum, the samples behind it, the count
    above ``ms_threshold`` and the max MS; ``count_rows``: the rows where each selected value
    counts once (times selected, times inhibited; -1: none). Uniform increments are the
    caller's to add (see ``Inhibitor._flush_lazy``); ``count_offset`` is the part of them not
    yet in ``count``; ``all_counted``: every neuron's count is known to be > 0. ``reuse``: the
    buffer the last call returned; its memory holds the copy when nothing else refers to it
    any more (no page faults of fresh memory). ``threads``: parallel tasks (0: torch's
    number of threads). ``delta`` (mode l2e): also the selected values' loss terms
    (``native_log_ms_terms`` against the pre-call mean), each sample's top-n then in
    increasing neuron order. ``counters`` = (calls, value, batches): the module's 0-dim int64
    buffers, written in the same call (calls = value; batches += 1 when ``merged``).
    """

    values: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor
    window: torch.Tensor
    prev_mean: torch.Tensor
    compensation: float
    top_n: int
    sqrt_threshold: float
    track: bool
    copy: bool
    select_threshold: float | None
    capped: bool
    forget_steps: int
    count_offset: int
    all_counted: bool
    window_rows: tuple[int, int, int, int]
    count_rows: tuple[int, int] = (-1, -1)
    reuse: torch.Tensor | None = None
    threads: int = 0
    delta: float | None = None
    counters: tuple[torch.Tensor, int, torch.Tensor] | None = None


def native_fold(call: FoldCall) -> FoldResult | None:
    """One training call measured and merged into the history in a single pass, in place
    (``measure_fold`` in native_kernel.cpp); None where it cannot run (the caller then takes
    the two-step path). The arguments are ``FoldCall``'s fields, passed to the extension in
    one call. Unlike ``native_measure`` a failure inside the kernel is not caught: it may have
    changed the history already, so falling back could merge the call twice."""
    values, top_n, select_threshold = call.values, call.top_n, call.select_threshold
    if values.device.type != "cpu" or values.dtype not in SUPPORTED_DTYPES:
        return None
    if values.dim() != 2 or values.numel() == 0 or not 1 <= top_n <= values.shape[1] or values.shape[1] >= 2**31:
        return None
    if select_threshold is not None and not select_threshold >= 0:
        return None
    module = load()
    if module is None or not hasattr(module, "measure_fold"):
        return None
    ms_sum_row, ms_n_row, above_row, max_row = call.window_rows
    selected_row, inhibited_row = call.count_rows
    calls, calls_value, batches = call.counters if call.counters is not None else (None, 0, None)
    neuron_index, flat_index, copied, buffer, var_sum, merged, terms, local = module.measure_fold(
        values.contiguous(),
        call.mean,
        call.var,
        call.count,
        call.window,
        call.prev_mean,
        float(call.compensation),
        int(top_n),
        float(call.sqrt_threshold),
        bool(call.track),
        bool(call.copy),
        int(call.threads),
        -1.0 if select_threshold is None else float(select_threshold),
        bool(call.capped),
        int(call.forget_steps),
        int(call.count_offset),
        bool(call.all_counted),
        ms_sum_row,
        ms_n_row,
        above_row,
        max_row,
        selected_row,
        inhibited_row,
        call.reuse,
        -1.0 if call.delta is None else float(call.delta),
        calls,
        int(calls_value),
        batches,
    )
    return FoldResult(
        neuron_index, flat_index, copied, buffer, var_sum, merged, None if terms is None else (terms, local)
    )


def native_reversed_gradient(
    grad: torch.Tensor, flat_index: torch.Tensor, strength: float, reuse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Reverse Deactivation's gradient (a copy of ``grad`` with the selected values times
    -strength) written into ``reuse`` when that buffer is free: (gradient, its buffer), or
    None where the native kernel does not apply (the caller clones)."""
    if grad.device.type != "cpu" or grad.dtype not in SUPPORTED_DTYPES or flat_index.device.type != "cpu":
        return None
    module = load()
    if module is None or not hasattr(module, "reversed_gradient"):
        return None
    out, buffer = module.reversed_gradient(grad, flat_index, float(strength), reuse)
    return out, buffer


def native_log_ms_terms(
    values: torch.Tensor, flat_index: torch.Tensor, neuron_index: torch.Tensor, mean: torch.Tensor, delta: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Mode l2e's loss terms from one loop (``log_ms_terms``): (sum of log(d^2 + delta),
    2d / (d^2 + delta) per selected value) with d = z - mean of the value's neuron; None where
    the native kernel does not apply."""
    if values.device.type != "cpu" or values.dtype not in SUPPORTED_DTYPES or values.dim() != 2:
        return None
    module = load()
    if module is None or mean.dtype != torch.float32:
        return None
    total, local = module.log_ms_terms(
        values, flat_index.contiguous(), neuron_index.contiguous(), mean.contiguous(), float(delta)
    )
    return total, local


def native_sparse_gradient(
    flat_index: torch.Tensor, local: torch.Tensor, grad_terms: torch.Tensor, shape: torch.Size, dtype: torch.dtype
) -> torch.Tensor | None:
    """Mode l2e's gradient of one call as a sparse COO tensor of ``shape`` (``local *
    grad_terms`` at the row-major ``flat_index``), marked coalesced where its indices are
    unique (sorted first if need be), so that autograd adds it into a dense gradient in
    O(selected values); None where the native kernel does not apply (use torch)."""
    if flat_index.device.type != "cpu" or len(shape) == 0 or dtype not in SUPPORTED_DTYPES:
        return None
    module = load()
    return None if module is None else module.sparse_gradient(flat_index, local, grad_terms, list(shape), dtype)


def set_vector_path(enabled: bool) -> bool:
    """Switch the kernel's register-blocked AVX-512 pass (top-1 and threshold selection) on
    or off, for tests that compare it with the portable pass bit for bit; returns whether this
    CPU can run it."""
    module = load()
    return bool(module is not None and module.set_vector_path(bool(enabled)))


def bookkeeping(tensor: torch.Tensor, kernel: str) -> Any:
    """The loaded extension when per-neuron bookkeeping of CPU ``tensor`` can run natively
    under ``kernel`` (``auto`` or ``native``), else None (the torch code runs)."""
    if kernel not in ("auto", "native") or tensor.device.type != "cpu":
        return None
    return load()
