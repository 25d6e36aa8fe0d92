"""The hot path: one training call's Monosemantic Scale, selection, moments and the RD op.

The Monosemantic Scale (MS) of value z of neuron j is phi = (z - mu_j)^2 / denom_j, so with
a_j = 1/sqrt(denom_j) the ranking of phi within a sample equals the ranking of
|(z - mu_j) * a_j|. A call needs two reductions over the [samples, neurons] values: over
samples (per-neuron sums of d = z - mu and d^2, max |d*a|, count above threshold) and over
neurons (each sample's top-n). Each is one pure function below; ``kernel="compiled"`` fuses
each into a single pass with ``torch.compile`` (the output copy rides in the second pass),
``kernel="eager"`` computes the same op by op (``eager_measure``).

Threshold selection (``select="threshold"``) replaces the per-sample top-n by one comparison
per value, |d*a| >= sqrt(tau) in float32 (NaN counts as above, as it ranks highest in top-n);
the selection is then the flat indices of those values in row-major order. The native kernel
does it in its single pass; ``compiled`` runs it eagerly (its data-dependent size does not fit
a full graph).
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Measurement:
    """What one call measured against the pre-call history (per neuron unless said otherwise)."""

    #: sum over samples of d = z - mu and of d^2 (float32, exact shift: mu is the history mean);
    #: None where the call was folded into the history in the same pass (``Inhibitor._fold``).
    sum_d: torch.Tensor | None
    sum_d2: torch.Tensor | None
    #: top-n selection: [samples, top_n] neuron indices selected in each sample; threshold
    #: selection: 1-D flat indices into [samples, neurons] (row-major order) of phi >= tau.
    selected: torch.Tensor
    #: max over samples of sqrt(phi), and samples with phi > threshold (tracked calls only).
    max_scaled: torch.Tensor | None
    above: torch.Tensor | None
    #: a copy of the values to modify (only when the call inhibits).
    copy: torch.Tensor | None
    #: whether ``selected`` holds flat indices (threshold selection).
    flat: bool = False
    #: both index forms of ``selected`` where the kernel already made them (the fused path).
    flat_indices: torch.Tensor | None = None
    neuron_indices: torch.Tensor | None = None
    #: whether the selections are already counted in the window (the fused path counts them).
    counted: bool = False
    #: mode l2e: the selected values' loss terms where the kernel already computed them
    #: (``log_ms_terms``' pair, against the pre-call mean; the fused path).
    terms: tuple[torch.Tensor, torch.Tensor] | None = None

    def flat_index(self, neurons: int) -> torch.Tensor:
        """Flat indices into the contiguous [samples, neurons] values of every selected value."""
        if self.flat_indices is not None:
            return self.flat_indices
        return self.selected if self.flat else flat_selection(self.selected, neurons)

    def neuron_index(self, neurons: int) -> torch.Tensor:
        """The neuron of every selected value (same order as ``flat_index``)."""
        if self.neuron_indices is not None:
            return self.neuron_indices
        return self.selected.remainder(neurons) if self.flat else self.selected.reshape(-1)


def column_pass(
    values: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, sqrt_threshold: float, track: bool
) -> tuple:
    """Per-neuron reductions over samples."""
    d = values.float() - mean
    sum_d = d.sum(0)
    sum_d2 = (d * d).sum(0)
    if not track:
        return sum_d, sum_d2, None, None
    scaled = (d * scale).abs()
    return sum_d, sum_d2, scaled.amax(0), (scaled > sqrt_threshold).sum(0, dtype=torch.int32)


def row_pass(values: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, top_n: int, copy: bool) -> tuple:
    """Each sample's top-n MS neurons (and the copy that will carry the modification)."""
    scaled = ((values.float() - mean) * scale).abs()
    if top_n == 1:
        selected = scaled.argmax(1, keepdim=True)
    else:
        selected = scaled.topk(top_n, 1, sorted=False).indices
    return selected, (values.clone() if copy else None)


_COMPILED: dict[str, Callable[..., Any]] = {}


def _compiled(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, fullgraph=True, dynamic=None)
    return _COMPILED[name]


def eager_measure(
    values: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    top_n: int,
    sqrt_threshold: float,
    track: bool,
    copy: bool,
    select_threshold: torch.Tensor | float | None = None,
) -> tuple:
    """Both passes op by op, with one scratch tensor reused in place (large CPU allocations
    cost page faults, so fewer of them is most of the eager speed). With ``select_threshold``
    (sqrt(tau), float32) the selection is the flat indices of |d*a| >= it (or NaN)."""
    scratch = values.float() - mean
    sum_d = scratch.sum(0)
    scaled = scratch.mul_(scale).abs_()  # sqrt(phi)
    if select_threshold is not None:
        selected = (~(scaled < select_threshold)).view(-1).nonzero().squeeze(1)
    elif top_n == 1:
        selected = scaled.argmax(1, keepdim=True)
    else:
        selected = scaled.topk(top_n, 1, sorted=False).indices
    max_scaled = above = None
    if track:
        max_scaled = scaled.amax(0)
        above = (scaled > sqrt_threshold).sum(0, dtype=torch.int32)
    sum_d2 = scaled.square_().sum(0) / scale.square()  # sum of phi over samples, back to d^2
    overflow = ~torch.isfinite(sum_d2) & torch.isfinite(sum_d)
    if bool(overflow.any()):  # phi overflowed float32 (near-zero variances): recompute exactly
        sum_d2 = torch.where(overflow, (values.double() - mean.double()).square().sum(0).float(), sum_d2)
    return sum_d, sum_d2, max_scaled, above, selected, (values.clone() if copy else None)


def maybe_compiled(fn: Callable[..., Any], kernel: str) -> Callable[..., Any]:
    """``fn`` itself for the eager kernel, its ``torch.compile`` form for the compiled one
    (per-neuron bookkeeping is many small vector ops: fused, they cost one pass)."""
    return _compiled(fn.__qualname__, fn) if kernel == "compiled" else fn


def accumulate_moments(pending: torch.Tensor, samples: int, sum_d: torch.Tensor, sum_d2: torch.Tensor) -> torch.Tensor:
    """New [count, sum_d, sum_d2] rows after adding a call; a neuron that saw a non-finite
    value in the call skips it (its statistics are not poisoned)."""
    finite = torch.isfinite(sum_d) & torch.isfinite(sum_d2)
    zero = torch.zeros_like(pending[0])
    return torch.stack(
        [
            pending[0] + torch.where(finite, float(samples), zero),
            pending[1] + torch.where(finite, sum_d.double(), zero),
            pending[2] + torch.where(finite, sum_d2.double(), zero),
        ]
    )


def measure(
    values: torch.Tensor,
    mean: torch.Tensor,
    scale: torch.Tensor,
    top_n: int,
    sqrt_threshold: float,
    track: bool,
    copy: bool,
    kernel: str = "eager",
    select_threshold: torch.Tensor | None = None,
    sorted_rows: bool = False,
) -> Measurement:
    """Measure a [samples, neurons] call against the history (``mean``, ``scale`` = 1/sqrt(denom)).

    ``select_threshold`` (a 0-dim float32 tensor, sqrt(tau)) selects by threshold instead of
    top-n (``compiled`` then runs eagerly). ``sorted_rows``: the native kernel gives each
    sample's top-n in increasing neuron order (mode l2e: a coalesced gradient); the others
    in no set order."""
    flat = select_threshold is not None
    if kernel == "auto":  # the fused C++ pass where it applies (CPU), else op by op
        from .native import SUPPORTED_DTYPES

        kernel = "native" if values.device.type == "cpu" and values.dtype in SUPPORTED_DTYPES else "eager"
    if kernel == "native":
        from .native import native_measure

        fused = native_measure(
            values,
            mean,
            scale,
            top_n,
            sqrt_threshold,
            track,
            copy,
            select_threshold=float(select_threshold) if flat else None,
            sorted_rows=sorted_rows,
        )
        if fused is not None:
            sum_d, sum_d2, max_scaled, above, selected, copied = fused
            return Measurement(sum_d, sum_d2, selected, max_scaled, above, copied, flat)
        kernel = "eager"  # unavailable here (warned once): the same result op by op
    if kernel != "compiled" or flat or _COMPILED.get("columns") is column_pass:
        sum_d, sum_d2, max_scaled, above, selected, copied = eager_measure(
            values, mean, scale, top_n, sqrt_threshold, track, copy, select_threshold
        )
        return Measurement(sum_d, sum_d2, selected, max_scaled, above, copied, flat)
    columns, rows = _compiled("columns", column_pass), _compiled("rows", row_pass)
    try:
        sum_d, sum_d2, max_scaled, above = columns(values, mean, scale, sqrt_threshold, track)
        selected, copied = rows(values, mean, scale, top_n, copy)
    except Exception as error:  # a missing C++ compiler, an unsupported backend: fall back, loudly
        warnings.warn(f"memel: compiled inhibition kernel failed ({error!r}); falling back to eager", stacklevel=2)
        _COMPILED["columns"], _COMPILED["rows"] = column_pass, row_pass
        return measure(values, mean, scale, top_n, sqrt_threshold, track, copy, "eager")
    return Measurement(sum_d, sum_d2, selected, max_scaled, above, copied)


def flat_selection(selected: torch.Tensor, neurons: int) -> torch.Tensor:
    """Flat indices into a contiguous [samples, neurons] tensor for per-row selections."""
    rows = torch.arange(selected.shape[0], device=selected.device).unsqueeze(1) * neurons
    return (rows + selected).reshape(-1)


class BufferSlot:
    """One reusable buffer of the native kernel: the last one it handed out, offered again
    (it is reused once nothing else refers to its memory; see ``reusable`` in native_kernel.cpp)."""

    __slots__ = ("tensor",)

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None


def log_ms_terms(
    values: torch.Tensor,
    flat_index: torch.Tensor,
    neuron_index: torch.Tensor,
    mean: torch.Tensor,
    delta: float,
    kernel_native: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mode l2e's loss terms of one call: (the float32 sum over the selected values of
    log((z - mu)^2 + delta), and per value its gradient 2(z - mu) / ((z - mu)^2 + delta)),
    z being ``values`` (contiguous [samples, neurons]) at ``flat_index`` and mu ``mean`` at
    ``neuron_index``; from one native loop where it applies (``kernel_native``, CPU)."""
    if kernel_native:
        from .native import native_log_ms_terms

        native = native_log_ms_terms(values, flat_index, neuron_index, mean, delta)
        if native is not None:
            return native
    d = values.reshape(-1).index_select(0, flat_index).float() - mean.index_select(0, neuron_index)
    shifted = d.square().add_(delta)
    local = d.mul_(2.0).div_(shifted)
    return shifted.log_().sum(), local


class LogMSLoss(torch.autograd.Function):
    """Mode l2e on one call: the activation passed through, and its loss terms with autograd
    to the activation (computed by ``log_ms_terms``: their sum ``terms`` and each selected
    value's gradient factor ``local``, at ``flat_index`` of the activation's contiguous
    row-major form).

    ``LogMSLoss.apply(activation, activation, terms, local, flat_index, in_place)`` returns
    (output, terms). The output shares the activation's memory and version counter (no copy:
    in-place rules are those of the activation itself) and passes its gradient through.

    Backward: the terms' gradient exists at the selected values only. With ``in_place``
    (native kernel, CPU) and a dense gradient of the output that autograd alone holds
    (``GradientOwnership``), it is added into that gradient in place, which then goes on as
    the activation's: O(selected values), no tensor allocated. Otherwise it is returned as a
    sparse COO tensor through the activation's first slot (coalesced:
    ``native_sparse_gradient``), the output's gradient through the second, and autograd adds
    the two (in place when that gradient is not a view and not shared, else into a new
    tensor). Where the output got no gradient, the terms' gradient is returned dense. While
    a gradient graph is recorded (``create_graph=True``) the sum is returned, differentiable
    in the output's gradient; the terms' own gradient is not differentiated again (their
    second derivative is not part of it).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        activation: torch.Tensor,
        again: torch.Tensor,
        terms: torch.Tensor,
        local: torch.Tensor,
        flat_index: torch.Tensor,
        in_place: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        ctx.shape, ctx.dtype, ctx.in_place = activation.shape, activation.dtype, in_place
        ctx.save_for_backward(flat_index, local)
        return activation.detach(), terms.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor | None, grad_terms: torch.Tensor | None):  # type: ignore[override]
        # (taken first, always at this point: what GradientOwnership calibrates against)
        references = sys.getrefcount(grad_output)
        none = (None, None, None, None)
        if grad_terms is None:
            return (None, grad_output, *none)
        flat_index, local = ctx.saved_tensors
        if grad_output is None or len(ctx.shape) == 0:
            dense = torch.zeros(ctx.shape, dtype=ctx.dtype, device=local.device)
            dense.view(-1).index_add_(0, flat_index, (local * grad_terms).to(ctx.dtype))
            return (None, dense if grad_output is None else dense + grad_output, *none)
        if ctx.in_place and OWNERSHIP.held_by_autograd(grad_output, references, LogMSLoss):
            from .native import load

            load().add_terms_gradient_(grad_output, flat_index, local, grad_terms)
            return (None, grad_output, *none)
        from .native import native_sparse_gradient

        sparse = native_sparse_gradient(flat_index, local, grad_terms, ctx.shape, ctx.dtype)
        if sparse is None:
            sparse = _sparse_gradient(flat_index, (local * grad_terms).to(ctx.dtype), ctx.shape)
        if torch.is_grad_enabled():  # create_graph: autograd would add sparse + dense, which torch refuses
            return (None, grad_output + sparse, *none)
        return (sparse, grad_output, *none)


class GradientOwnership:
    """Whether a gradient handed to ``LogMSLoss``'s or ``ReverseDeactivation``'s backward is
    held by autograd alone, so that changing it in place changes nothing anyone else can see.

    Autograd itself accumulates in place only into a gradient whose TensorImpl and storage
    have a single holder; a gradient that arrives as a view (a linear layer applied to a 3-D
    activation hands back a reshaped matrix product) never qualifies, and then adding the
    sparse terms writes a fresh activation-sized tensor on every call. Here the test is: no
    gradient graph being recorded; a plain dense contiguous CPU tensor whose storage only it
    (and, for a view, a base that only the view holds) shares (``gradient_ownership`` in
    native_kernel.cpp); and its Python reference count and TensorImpl use count equal those
    of a gradient known to be held by autograd alone, measured once per process by a probe
    backward through the same code (``calibrate``). A hook that kept the gradient, a caller's
    ``grad_outputs`` or any other holder raises a count, and the sparse path (or RD's copy)
    runs instead. Where the probe cannot run or sees anything unexpected (no native kernel,
    inference mode, a backward of another thread during it), in-place changes stay off.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._expected: dict[type, tuple[int, int]] = {}  # per Function: (Python references, use count)
        self._calibrated = False
        self._probe: list[tuple[int, int, bool]] | None = None

    def calibrate(self) -> bool:
        """Measure the counts once per process (two tiny backwards); whether in-place
        changes are available (the native kernel loads and both probes saw the expected case)."""
        if not self._calibrated and not torch.is_inference_mode_enabled():  # (then: at a later call)
            from .native import load

            with self._lock:
                if not self._calibrated:
                    module = load()
                    if module is not None and hasattr(module, "gradient_ownership"):
                        try:
                            self._expected = self._measure()
                        except Exception:  # noqa: BLE001  (an autograd setting the probe cannot run under)
                            self._expected = {}
                    self._calibrated = True
        return bool(self._expected)

    def _measure(self) -> dict[type, tuple[int, int]]:
        """Run each Function's backward once on a gradient that autograd alone holds (the
        product of a linear layer on a 3-D activation, reshaped: a view only it holds)."""
        expected: dict[type, tuple[int, int]] = {}
        for function in (LogMSLoss, ReverseDeactivation):
            self._probe = []
            try:
                with torch.enable_grad():
                    h = torch.zeros(2, 3, 4, requires_grad=True) * 1.0
                    flat_index = torch.tensor([1, 6])
                    if function is LogMSLoss:
                        out, terms = LogMSLoss.apply(h, h, torch.zeros(()), torch.ones(2), flat_index, True)
                    else:
                        values = h.view(6, 4)
                        copy = values.detach().clone()
                        out = ReverseDeactivation.apply(values, copy, flat_index, torch.zeros(2), 2.0, None, True)
                        out, terms = out.view(2, 3, 4), 0.0
                    (torch.nn.functional.linear(out, torch.ones(3, 4)).sum() + terms).backward()
                seen = self._probe
            finally:
                self._probe = None
            if len(seen) != 1 or not seen[0][2]:
                return {}
            expected[function] = (seen[0][0], seen[0][1])
        return expected

    def held_by_autograd(self, grad: torch.Tensor, references: int, function: type) -> bool:
        """Whether ``grad`` (with ``references`` Python references, taken first thing in
        ``function``'s backward) is held by autograd alone."""
        from .native import SUPPORTED_DTYPES, load

        if torch.is_grad_enabled() or grad.dtype not in SUPPORTED_DTYPES:
            return False
        if self._probe is None and not self._expected:
            return False

        use_count, plain = load().gradient_ownership(grad)
        if self._probe is not None:  # the calibration's own backward
            self._probe.append((references, use_count, plain))
            return False
        return plain and self._expected.get(function) == (references, use_count)


OWNERSHIP = GradientOwnership()


def _sparse_gradient(flat_index: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``native_sparse_gradient`` with torch ops: sorted by flat index, coalesced if unique."""
    if flat_index.numel() > 1 and not bool((flat_index[1:] > flat_index[:-1]).all()):
        flat_index, order = flat_index.sort()
        values = values.index_select(0, order)
    unique = flat_index.numel() < 2 or bool((flat_index[1:] > flat_index[:-1]).all())
    indices = torch.stack(torch.unravel_index(flat_index, shape))
    return torch.sparse_coo_tensor(
        indices, values, shape, dtype=values.dtype, device=values.device, check_invariants=False, is_coalesced=unique
    )


class ReverseDeactivation(torch.autograd.Function):
    """z' = -D*z + (mu + D*z).detach() at the selected values; identity elsewhere.

    Forward: selected values become the neuron mean (written into ``output``, a fresh copy
    of ``values``). Backward: their gradient is multiplied by -D (D=0: no gradient, naive
    (a); D=-1: unchanged, naive (b)); every other gradient passes through untouched. With
    ``in_place`` (CPU, native kernel) the selected values of a gradient that autograd alone
    holds (``GradientOwnership``) are changed in place; any other gradient is copied, into
    ``grad_slot``'s buffer when there is one and it is free, else into a fresh tensor.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        values: torch.Tensor,
        output: torch.Tensor,
        flat_index: torch.Tensor,
        replacement: torch.Tensor,
        strength: float,
        grad_slot: BufferSlot | None = None,
        in_place: bool = False,
    ):
        output.view(-1).index_copy_(0, flat_index, replacement.to(output.dtype))
        ctx.mark_dirty(output)
        ctx.save_for_backward(flat_index)
        ctx.strength = strength
        ctx.grad_slot = grad_slot
        ctx.in_place = in_place
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        # (taken first, always at this point: what GradientOwnership calibrates against)
        references = sys.getrefcount(grad_output)
        (flat_index,) = ctx.saved_tensors
        strength = ctx.strength
        none = (None, None, None, None, None, None)
        if strength == -1.0:
            return grad_output, *none
        if ctx.in_place and OWNERSHIP.held_by_autograd(grad_output, references, ReverseDeactivation):
            from .native import load

            load().reverse_selected_(grad_output, flat_index, strength)
            return grad_output, *none
        slot = ctx.grad_slot
        if slot is not None:
            from .native import native_reversed_gradient

            reused = native_reversed_gradient(grad_output, flat_index, strength, slot.tensor)
            if reused is not None:
                grad, slot.tensor = reused
                return grad, *none
        grad = grad_output.contiguous().clone() if grad_output.is_contiguous() else grad_output.contiguous()
        flat = grad.view(-1)
        if strength == 0.0:
            flat.index_fill_(0, flat_index, 0.0)
        else:
            flat.index_copy_(0, flat_index, flat.index_select(0, flat_index) * (-strength))
        return grad, *none
