"""The Inhibitor module: tracks per-neuron statistics and inhibits monosemantic values."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memel.errors import ConfigError

from .collectives import all_gather_rows, distributed_world, reduce_scatter_rows, reduce_windows
from .config import InhibitionConfig, initial_threshold
from .kernels import (
    OWNERSHIP,
    BufferSlot,
    LogMSLoss,
    Measurement,
    ReverseDeactivation,
    accumulate_moments,
    log_ms_terms,
    maybe_compiled,
    measure,
)
from .layout import (
    P_COUNT,
    P_SUM_D,
    P_SUM_D2,
    PAYLOAD_ROWS,
    PENDING_ROWS,
    T_ABOVE,
    T_JUDGED,
    TAU_PENDING,
    W_ABOVE,
    W_INHIBITED,
    W_MS_MAX,
    W_MS_N,
    W_MS_SUM,
    W_SELECTED,
    W_TRACKED,
    WINDOW_ROWS,
)
from .native import FoldCall, bookkeeping, native_fold
from .sharding import (
    C_ABOVE,
    C_MS_N,
    C_MS_SUM,
    C_SELECTED,
    COUNTER_ROWS,
    E_COUNTED,
    E_TAU_ABOVE,
    E_TAU_JUDGED,
    E_TRACKED,
    EXTRAS,
    S_ABOVE,
    S_INHIBITED,
    S_MS_N,
    S_SELECTED,
    SHARD_COUNT_ROWS,
    Shard,
)
from .statistics import Moments, inverse_sqrt_denominator, merge_history, variance_denominator
from .sync import InhibitorGroup, PendingReduction, sync_inhibitors

#: Largest change of log(tau) in one update, and the range tau is kept in.
TAU_MAX_LOG_STEP = 1.0
TAU_RANGE = (1e-30, 1e30)
_DIST_AVAILABLE = dist.is_available()
#: The window rows ``native_fold`` writes: MS sum, samples behind it, count above, max MS.
_FOLD_WINDOW_ROWS = (W_MS_SUM, W_MS_N, W_ABOVE, W_MS_MAX)


def _dist_initialized() -> bool:
    """Whether a torch.distributed process group is up (a cheap first check on every call)."""
    return _DIST_AVAILABLE and dist.is_initialized()


def threshold_update(
    tau: torch.Tensor, above: torch.Tensor, judged: torch.Tensor, fraction: float, rate: float
) -> torch.Tensor:
    """The next tau after one merged batch in which ``above`` of ``judged`` values had phi >= tau:
    log tau += clip(rate * (above/judged - fraction) / fraction, -1, 1) (unchanged if judged == 0).

    A stochastic-approximation (Robbins-Monro) step in log space: its fixed point is the tau at
    which the expected fraction selected is ``fraction``, i.e. the (1 - fraction) quantile of
    phi; in log space the step is relative, so it works at any scale of phi; dividing by the
    fraction makes the rate a relative error gain. Pure float64 arithmetic on the reduced counts:
    the same on every rank."""
    observed = above / judged.clamp_min(1)
    step = ((observed - fraction) * (rate / fraction)).clamp(-TAU_MAX_LOG_STEP, TAU_MAX_LOG_STEP)
    step = torch.where(judged > 0, step, torch.zeros_like(step))
    return (tau * step.exp()).clamp(*TAU_RANGE)


def merge_payload(
    mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, payload: torch.Tensor, capped: bool, forget_steps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """New (mean, var, count) after merging one payload of moments as a batch (pure: fusable)."""
    batch = Moments.from_shifted_sums(payload[P_COUNT], payload[P_SUM_D], payload[P_SUM_D2], mean.double())
    # only whether the history is capped matters to the merge (a bool keeps compiled code stable)
    return merge_history(mean, var, count, forget_steps if capped else 0, batch, forget_steps)


@dataclass
class Snapshot:
    """Per-neuron state of one Inhibitor at a point in training (flat neuron order)."""

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor
    selected_count: torch.Tensor
    inhibited_count: torch.Tensor
    max_ms: torch.Tensor
    mean_ms: torch.Tensor
    frac_above: torch.Tensor
    batches: int
    neuron_shape: tuple[int, ...]

    def as_numpy(self) -> dict[str, Any]:
        return {
            key: value.cpu().numpy() if isinstance(value, torch.Tensor) else value for key, value in vars(self).items()
        }


#: Plain Python attributes the hot path sets on every call: set directly, not through
#: ``nn.Module.__setattr__`` (which checks parameters, submodules and buffers first).
_PLAIN_STATE = frozenset(
    {
        "_calls",
        "_batches",
        "_has_pending",
        "_scale",
        "_select_above",
        "_loss_sum",
        "_loss_count",
        "_lazy_count",
        "_lazy_ms_n",
        "_lazy_tracked",
        "_compensation",
        "_prev_mean",
        "_all_counted",
        "_shape",
        "_foreign_shard",
    }
)


class Inhibitor(nn.Module):
    """Monosemantic Scale tracking and Reverse Deactivation for one activation.

    Has no parameters. In eval mode it is an exact identity. In training mode each call
    (1) merges the statistics of earlier calls that are still pending (``stats_update="call"``),
    (2) computes every value's Monosemantic Scale against the history, which excludes this
    call, (3) selects the top-n values of each sample (or, with ``select="threshold"``, every
    value with phi >= tau) and, once the history holds ``late_start`` batches, inhibits them
    according to ``mode``, and (4) records the call's moments (and the count above tau) as
    pending. All state lives in buffers, so it travels with ``state_dict``. Outside a
    distributed run, with ``stats_update="call"`` and the native kernel, (1)-(4) are one fused
    pass that merges the call at once (``_fold``; the same bits as merging it at the next call).

    Threshold selection: ``tau`` (a float64 buffer) starts at ``initial_threshold(fraction)``
    and is updated by ``threshold_update`` whenever pending statistics are merged (each call
    with ``stats_update="call"``, each ``memel.sync`` with ``"step"``, from the global counts),
    also during the late start, so that it has converged when inhibition begins.

    Mode ``l2e``: the output has the input's values and memory (no copy); the loss terms of
    the values selected in every training call after the late start are kept (with autograd)
    until ``auxiliary_loss()`` (or ``memel.auxiliary_loss(model)``) turns them into the loss
    and forgets them. Their gradient is added in place into the downstream gradient where
    autograd alone holds it, else it reaches the activation sparsely (``LogMSLoss``).
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor
    batches: torch.Tensor
    calls: torch.Tensor
    neuron_shape: torch.Tensor
    pending: torch.Tensor
    window: torch.Tensor
    tau: torch.Tensor
    tau_pending: torch.Tensor

    def __init__(self, config: InhibitionConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = InhibitionConfig(**overrides)
        elif overrides:
            config = InhibitionConfig(**{**config.model_dump(exclude_unset=True), **overrides})
        self.config = config
        self._register_state(0, ())
        self._batches = 0
        self._calls = 0
        self._has_pending = False
        self._scale: torch.Tensor | None = None  # 1/sqrt(MS denominator) of the current history
        #: The process group its statistics and snapshots reduce over (None: the default group);
        #: set by ``memel.inhibit(..., process_group=)``.
        self.process_group: Any = None
        #: The modules synced together with it (set by ``memel.inhibit``; None: synced alone).
        self.sync_group: InhibitorGroup | None = None
        self._reduction: PendingReduction | None = None  # an asynchronous sync whose result is not applied yet
        self._select_above: torch.Tensor | None = None  # float32 sqrt(tau) of threshold selection
        self._loss_sum: torch.Tensor | None = None  # mode l2e: sum of log((z-mu)^2+delta) not yet consumed
        self._loss_count = 0
        self._clear_fold_state()

    # ----------------------------------------------------------------------------------
    # state
    def _register_state(
        self, neurons: int, shape: tuple[int, ...], device: torch.device | str = "cpu", shard: Shard | None = None
    ) -> None:
        """Buffers for ``neurons`` neurons of ``shape``; with ``shard`` only the shard's columns
        (``shard.padded`` of them) and a compact window (``_register_shard_window``)."""
        self._shard = shard
        if shard is not None:
            neurons = shard.padded

        def f32() -> torch.Tensor:
            return torch.zeros(neurons, dtype=torch.float32, device=device)

        self.register_buffer("mean", f32())
        self.register_buffer("var", f32())
        self.register_buffer("count", torch.zeros(neurons, dtype=torch.int64, device=device))
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("neuron_shape", torch.tensor(shape, dtype=torch.int64, device=device))
        self.register_buffer("pending", torch.zeros(PENDING_ROWS, neurons, dtype=torch.float64, device=device))
        if shard is None:
            self.register_buffer("window", torch.zeros(WINDOW_ROWS, neurons, dtype=torch.float64, device=device))
        else:
            self._register_shard_window(neurons, device)
        tau = initial_threshold(self.config.fraction)
        self.register_buffer("tau", torch.tensor(tau, dtype=torch.float64, device=device))
        self.register_buffer("tau_pending", torch.zeros(TAU_PENDING, dtype=torch.float64, device=device))
        self._select_above = None
        self._shape: tuple[int, ...] | None = None  # neuron_shape as a tuple (cached: read every call)
        self._foreign_shard = False  # sharded: holds another rank's shard (loaded from its state_dict)
        self._clear_fold_state()

    def _register_shard_window(self, padded: int, device: torch.device | str) -> None:
        """A shard's snapshot window: the counters as int32 rows (``S_*``), the MS sum in float64,
        the max MS in float32 (what a snapshot reports), the samples tracked as one number
        (every neuron shares it); 28 bytes a neuron instead of the replicated window's 56."""
        self._buffers.pop("window", None)
        counts = torch.zeros(SHARD_COUNT_ROWS, padded, dtype=torch.int32, device=device)
        self.register_buffer("window_counts", counts)
        self.register_buffer("window_ms_sum", torch.zeros(padded, dtype=torch.float64, device=device))
        self.register_buffer("window_ms_max", torch.zeros(padded, dtype=torch.float32, device=device))
        self.register_buffer("window_tracked", torch.zeros((), dtype=torch.int64, device=device))
        # samples counted over all neurons since the last merge (whether the pending batch counts)
        self.register_buffer("pending_counted", torch.zeros((), dtype=torch.float64, device=device))
        shard = self._shard
        assert shard is not None
        layout = torch.tensor([shard.neurons, shard.world, shard.rank], dtype=torch.int64, device=device)
        self.register_buffer("shard", layout)  # which shard it is: neurons, ranks, rank

    def _shard_for(self, neurons: int) -> Shard | None:
        """This rank's shard of ``neurons`` where ``execution.shard_statistics`` is on and the
        module's process group has more than one rank (None: the whole, replicated)."""
        world = distributed_world(self.process_group)
        if not self.config.execution.shard_statistics or world is None:
            return None
        return Shard(neurons, world, dist.get_rank(self.process_group))

    def _clear_fold_state(self) -> None:
        # The local fused path (``_fold``) adds the increments that every neuron shares (count,
        # and the window's samples behind the mean MS and samples tracked) here, not to the
        # buffers: ``_flush_lazy`` adds them before anything reads those buffers.
        self._lazy_count = 0
        self._lazy_ms_n = 0
        self._lazy_tracked = 0
        self._compensation: float | None = None  # eps * mean(var) of the current history
        self._prev_mean: torch.Tensor | None = None  # the history mean the last folded call judged against
        # the output copy's and the gradient's buffers, reused once free (config.execution.reuse_buffers)
        self._copy_slot = BufferSlot()
        self._grad_slot = BufferSlot()
        self._all_counted = False  # known: every neuron's count > 0 (counts never fall)

    @torch.no_grad()
    def _flush_lazy(self) -> None:
        """Add the lazily kept uniform increments to ``count`` and the window (exact integers)."""
        if self._lazy_count:
            self.count.add_(self._lazy_count)
            self._lazy_count = 0
        if self._lazy_ms_n:
            self.window[W_MS_N].add_(self._lazy_ms_n)
            self._lazy_ms_n = 0
        if self._lazy_tracked:
            self.window[W_TRACKED].add_(self._lazy_tracked)
            self._lazy_tracked = 0

    @property
    def initialized(self) -> bool:
        """Whether the module has seen a training call (and so knows its neuron count)."""
        return self.mean.numel() > 0

    @property
    def neurons(self) -> int:
        """Neurons of the module (all of them, also where this rank holds a shard)."""
        return self._shard.neurons if self._shard is not None else self.mean.numel()

    @property
    def held_neurons(self) -> int:
        """Neurons whose state this rank holds: all, or its shard's ``padded`` columns."""
        return self.mean.numel()

    @property
    def sharded(self) -> bool:
        """Whether this rank holds only its shard of the statistics (``execution.shard_statistics``)."""
        return self._shard is not None

    @property
    def device(self) -> torch.device:
        """Where its statistics live."""
        return self.mean.device

    @property
    def has_pending(self) -> bool:
        """Whether this rank holds statistics not yet merged into the history."""
        return self._has_pending

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PLAIN_STATE:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Inhibitor:
        # model.half()/bfloat16() must not lower the statistics' precision: keep dtypes, follow devices.
        self.settle()
        kept = dict(self._buffers)
        self._scale = None
        self._select_above = None
        self._prev_mean = None
        self._copy_slot, self._grad_slot = BufferSlot(), BufferSlot()
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():
            old = kept.get(name)
            if buffer is not None and old is not None and buffer.dtype != old.dtype:
                self._buffers[name] = old.to(device=buffer.device)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        self.settle()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        self.settle()
        incoming = state_dict.get(prefix + "mean")
        shape_key = prefix + "neuron_shape"
        incoming_shard = state_dict.get(prefix + "shard")
        if incoming_shard is not None or (self._shard is not None and incoming is not None):
            self._load_shard_layout(incoming_shard, state_dict.get(shape_key), prefix)
        elif incoming is not None and incoming.numel() != self.neurons and shape_key in state_dict:
            shape = tuple(int(v) for v in state_dict[shape_key].tolist())
            self._register_state(incoming.numel(), shape, self.mean.device)
        if incoming is not None:  # a checkpoint from before threshold selection: start tau afresh
            for name in ("tau", "tau_pending"):
                state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._shape = None
        self._batches = int(self.batches.item())
        self._scale = None
        self._select_above = None
        self._compensation = None
        self._all_counted = False
        self._calls = int(self.calls.item())
        if self._shard is not None:
            shard = self._shard
            self.shard.copy_(torch.tensor([shard.neurons, shard.world, shard.rank]))  # its own, not the file's
            counted = bool(self.pending_counted.item() > 0)
        else:
            counted = bool(self.neurons) and bool((self.pending[P_COUNT] > 0).any().item())
        self._has_pending = counted or bool(self.tau_pending[T_JUDGED].item() > 0)

    def _load_shard_layout(self, incoming: torch.Tensor | None, shape: torch.Tensor | None, prefix: str) -> None:
        """Set up this rank's shard for a sharded state_dict (``incoming``: its ``shard`` buffer),
        refusing a replicated one, or one sharded over another number of ranks. A shard of
        another rank loads (DeepSpeed restores rank 0's module state on every rank) but marks
        the module: it refuses to run until this rank's own shard is loaded."""
        where = prefix.removesuffix(".") or "Inhibitor"
        if incoming is None or shape is None:
            raise RuntimeError(
                f"{where}: its statistics are sharded (execution.shard_statistics); a replicated state_dict does "
                "not load into it: load one saved with shard_statistics on the same ranks"
            )
        neurons, world, rank = (int(v) for v in incoming.tolist())
        shard = self._shard_for(neurons)
        if shard is None or shard.world != world:
            ranks = 1 if shard is None else shard.world
            raise RuntimeError(
                f"{where}: this state_dict holds statistics sharded over {world} ranks (execution.shard_statistics); "
                f"here they would be sharded over {ranks}: load it with {world} ranks and shard_statistics on"
            )
        if self._shard != shard:
            self._register_state(neurons, tuple(int(v) for v in shape.tolist()), self.mean.device, shard)
        self._foreign_shard = rank != shard.rank

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_loss_sum"], state["_loss_count"] = None, 0  # a graph is not state (and cannot be copied)
        state["_copy_slot"], state["_grad_slot"] = BufferSlot(), BufferSlot()  # scratch memory
        return state

    def train(self, mode: bool = True) -> Inhibitor:
        """Switching to eval mode drops unconsumed ``l2e`` loss terms (they belong to training forwards)."""
        if not mode:
            self._clear_loss()
        return super().train(mode)

    # ----------------------------------------------------------------------------------
    # forward
    def forward(self, activation: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return activation
        self.finish_reduction()  # (not settle: lazily kept increments stay lazy on the hot path)
        if self._has_pending and self.config.stats_update == "call":
            if self.sync_group is not None:
                self.sync_group.flush()
            else:
                sync_inhibitors([self])
        values = self._as_samples(activation)
        if not self.initialized:
            shape = self._neuron_shape_of(activation)
            self._register_state(values.shape[1], shape, activation.device, self._shard_for(values.shape[1]))
        self._calls += 1
        if self._shard is not None:
            if self._foreign_shard:
                raise RuntimeError(
                    "Inhibitor: it holds another rank's shard of its statistics (loaded from that rank's "
                    "state_dict); load this rank's own state_dict before training"
                )
            return self._forward_sharded(activation, values)
        if self._batches == 0:
            self.calls.fill_(self._calls)
            self._record_first(values)
            return activation
        config = self.config
        inhibiting = config.modifies and self._batches >= config.late_start
        track = (self._calls - 1) % config.execution.track_every == 0
        select_above = self._threshold_operand() if config.by_threshold else None
        l2e = config.mode == "l2e"
        rewrite = inhibiting and not l2e  # l2e leaves the forward values alone
        measured = self._fold(values, track, rewrite, select_above, inhibiting)  # (writes calls too)
        folded = measured is not None
        if measured is None:
            self.calls.fill_(self._calls)
            if self._scale is None:
                self._scale = inverse_sqrt_denominator(self.var, config.eps)
            with torch.no_grad():
                measured = measure(
                    values.detach(),
                    self.mean,
                    self._scale,
                    config.top_n,
                    math.sqrt(config.ms_threshold),
                    track,
                    rewrite,
                    config.execution.kernel,
                    select_above,
                    sorted_rows=l2e,
                )
            self._record(values.shape[0], measured)
        # the history the call was judged against (a folded call has already merged itself)
        judged_mean = self._prev_mean if folded else self.mean
        assert judged_mean is not None
        neuron_index = measured.neuron_index(values.shape[1])
        if not measured.counted:
            self._count_selections(neuron_index, inhibiting)
        if not inhibiting:
            return activation
        return self._inhibit(activation, values, measured, judged_mean, neuron_index)

    def _inhibit(
        self,
        activation: torch.Tensor,
        values: torch.Tensor,
        measured: Measurement,
        judged_mean: torch.Tensor,
        neuron_index: torch.Tensor,
    ) -> torch.Tensor:
        """The call's output with its selected values inhibited (``mode``) against ``judged_mean``."""
        config = self.config
        l2e = config.mode == "l2e"
        flat_index = measured.flat_index(values.shape[1])
        if l2e:
            terms = measured.terms
            if terms is None:
                native = config.execution.kernel in ("auto", "native")
                terms = log_ms_terms(values.detach(), flat_index, neuron_index, judged_mean, config.delta, native)
            return self._add_loss_terms(activation, terms, flat_index)
        assert measured.copy is not None
        replacement = judged_mean.index_select(0, neuron_index)
        native = self._native_cpu(activation)
        output = ReverseDeactivation.apply(
            values,
            measured.copy,
            flat_index,
            replacement,
            config.effective_strength,
            self._grad_slot if native and config.execution.reuse_buffers else None,
            native and OWNERSHIP.calibrate(),
        )
        return output.view(activation.shape)

    # ----------------------------------------------------------------------------------
    # sharded statistics (execution.shard_statistics): see sharding.py
    def _forward_sharded(self, activation: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """A training call whose history is sharded: the module's mean and variance gathered for
        this call only, the call measured against them as in one process, its contributions
        reduce-scattered into the shards."""
        config = self.config
        self.calls.fill_(self._calls)
        samples = values.shape[0]
        if self._batches == 0:  # no history yet (mu = 0): exact float64 sums, nothing judged
            x = values.detach().double()
            self._reduce_call(samples, x.sum(0), x.square().sum(0))
            return activation
        inhibiting = config.modifies and self._batches >= config.late_start
        track = (self._calls - 1) % config.execution.track_every == 0
        select_above = self._threshold_operand() if config.by_threshold else None
        l2e = config.mode == "l2e"
        mean, scale = self._gathered_history()
        with torch.no_grad():
            measured = measure(
                values.detach(),
                mean,
                scale,
                config.top_n,
                math.sqrt(config.ms_threshold),
                track,
                inhibiting and not l2e,
                config.execution.kernel,
                select_above,
                sorted_rows=l2e,
            )
        neuron_index = measured.neuron_index(values.shape[1])
        assert measured.sum_d is not None and measured.sum_d2 is not None
        self._reduce_call(samples, measured.sum_d, measured.sum_d2, measured, scale, neuron_index, inhibiting)
        if not inhibiting:
            return activation
        return self._inhibit(activation, values, measured, mean, neuron_index)

    @torch.no_grad()
    def _gathered_history(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The module's history mean and MS scale (1/sqrt(var + eps*mean(var))) for all its
        neurons, from every rank's shard (one all-gather; the caller's to free)."""
        full = all_gather_rows(torch.stack([self.mean, self.var]), self.neurons, self.process_group)
        return full[0].contiguous(), inverse_sqrt_denominator(full[1], self.config.eps)

    @torch.no_grad()
    def _reduce_call(
        self,
        samples: int,
        sum_d: torch.Tensor,
        sum_d2: torch.Tensor,
        measured: Measurement | None = None,
        scale: torch.Tensor | None = None,
        neuron_index: torch.Tensor | None = None,
        inhibiting: bool = False,
    ) -> None:
        """Add one call's contributions of every rank into this rank's shard: the moments (as
        ``_add_moments``) with the numbers every rank needs, then (a measured call) the window
        counters and, on tracked calls, the max MS. Two or three collectives."""
        shard, group = self._shard, self.process_group
        assert shard is not None
        finite = torch.isfinite(sum_d) & torch.isfinite(sum_d2)
        zero = torch.zeros((), dtype=torch.float64, device=sum_d.device)
        moments = torch.stack(
            [
                finite.double() * samples,
                torch.where(finite, sum_d.double(), zero),
                torch.where(finite, sum_d2.double(), zero),
            ]
        )
        extras = torch.zeros(EXTRAS, dtype=torch.float64, device=sum_d.device)
        extras[E_COUNTED] = moments[P_COUNT].sum()
        tracked = measured is not None and measured.max_scaled is not None and measured.above is not None
        if tracked:
            extras[E_TRACKED] = samples
        if measured is not None and measured.flat:
            extras[E_TAU_ABOVE] = measured.selected.numel()
            extras[E_TAU_JUDGED] = samples * self.neurons
        rows, totals = reduce_scatter_rows(moments, extras, shard.padded, dist.ReduceOp.SUM, group)
        self.pending[P_COUNT : P_SUM_D2 + 1] += rows
        self.pending_counted += totals[E_COUNTED]
        self.window_tracked += totals[E_TRACKED].to(torch.int64)  # (no host sync)
        self.tau_pending[T_ABOVE] += totals[E_TAU_ABOVE]
        self.tau_pending[T_JUDGED] += totals[E_TAU_JUDGED]
        self._has_pending = True
        if measured is None:
            return
        assert scale is not None and neuron_index is not None
        self._reduce_counters(samples, sum_d2, measured, scale, neuron_index, inhibiting)
        if tracked:
            assert measured.max_scaled is not None
            squared = torch.nan_to_num(measured.max_scaled.double().square(), nan=0.0)
            top = squared.clamp_max(torch.finfo(torch.float32).max).float().unsqueeze(0)
            empty = torch.zeros(0, dtype=torch.float32, device=top.device)
            largest, _ = reduce_scatter_rows(top, empty, shard.padded, dist.ReduceOp.MAX, group)
            torch.maximum(self.window_ms_max, largest[0], out=self.window_ms_max)

    def _reduce_counters(
        self,
        samples: int,
        sum_d2: torch.Tensor,
        measured: Measurement,
        scale: torch.Tensor,
        neuron_index: torch.Tensor,
        inhibiting: bool,
    ) -> None:
        """The window's summed rows of one call (MS sum, its samples, samples above, times
        selected) of every rank into this rank's shard: one float32 reduce-scatter (counts
        per call are exact integers in float32)."""
        shard = self._shard
        assert shard is not None
        finite = torch.isfinite(sum_d2)
        counters = torch.zeros(COUNTER_ROWS, self.neurons, dtype=torch.float32, device=sum_d2.device)
        phi_sum = torch.where(finite, sum_d2.double(), 0.0) * scale.square().double()
        counters[C_MS_SUM] = phi_sum.float()
        counters[C_MS_N] = finite.float() * samples
        if measured.above is not None:
            counters[C_ABOVE] = measured.above.float()
        ones = torch.ones(neuron_index.numel(), dtype=torch.float32, device=neuron_index.device)
        counters[C_SELECTED].index_add_(0, neuron_index, ones)
        empty = torch.zeros(0, dtype=torch.float32, device=counters.device)
        rows, _ = reduce_scatter_rows(counters, empty, shard.padded, dist.ReduceOp.SUM, self.process_group)
        counts = rows.round().to(torch.int32)
        self.window_ms_sum += rows[C_MS_SUM].double()
        self.window_counts[S_MS_N] += counts[C_MS_N]
        self.window_counts[S_ABOVE] += counts[C_ABOVE]
        self.window_counts[S_SELECTED] += counts[C_SELECTED]
        if inhibiting:
            self.window_counts[S_INHIBITED] += counts[C_SELECTED]

    def _native_cpu(self, activation: torch.Tensor) -> bool:
        """Whether the native kernel may handle this call's gradient (configured, CPU)."""
        return self.config.execution.kernel in ("auto", "native") and activation.device.type == "cpu"

    def _threshold_operand(self) -> torch.Tensor:
        """sqrt(tau) as a float32 0-dim tensor (what ``|d*a|`` is compared with), cached until tau changes."""
        if self._select_above is None:
            self._select_above = self.tau.sqrt().float()
        return self._select_above

    def _add_loss_terms(
        self, activation: torch.Tensor, terms: tuple[torch.Tensor, torch.Tensor], flat_index: torch.Tensor
    ) -> torch.Tensor:
        """Mode l2e: keep the call's sum of log((z - mu)^2 + delta) over the selected values
        (``terms``: that sum and each value's gradient factor, from ``log_ms_terms``; mu is the
        pre-call history mean) with autograd to the activation; returns the activation passed
        through (``LogMSLoss``: same memory; the terms' gradient is added in place into a
        downstream gradient only autograd holds, else sparsely)."""
        in_place = self._native_cpu(activation) and OWNERSHIP.calibrate()
        output, total = LogMSLoss.apply(activation, activation, terms[0], terms[1], flat_index, in_place)
        self._loss_sum = total if self._loss_sum is None else self._loss_sum + total
        self._loss_count += flat_index.numel()
        return output

    def _as_samples(self, activation: torch.Tensor) -> torch.Tensor:
        """The activation as contiguous [samples, neurons] values, checked against the neurons
        the module was set up for (and ``top_n``)."""
        if not activation.is_floating_point():
            raise TypeError(f"Inhibitor expects a floating-point activation, got {activation.dtype}")
        config = self.config
        shape = activation.shape
        if config.layout == "element":
            if len(shape) < 2:
                raise ValueError(
                    f"layout='element' needs an activation of shape [batch, ...] with at least 2 dims, "
                    f"got shape {tuple(shape)}; use layout='channel'"
                )
            values = activation.reshape(shape[0], -1)
            neuron_shape = tuple(shape[1:])
        else:
            values = activation.reshape(-1, shape[-1]) if shape else activation.reshape(1, 1)
            neuron_shape = (values.shape[1],)
        known = self._shape
        if known is None and self._buffers["mean"].numel():
            known = self._shape = tuple(self.neuron_shape.tolist())
        if known is not None and neuron_shape != known:
            raise ValueError(
                f"Inhibitor(layout={config.layout!r}) was set up for neurons of shape {known}, got an activation "
                f"of shape {tuple(shape)} (neurons {neuron_shape}); with layout='element' every batch needs the "
                "same per-sample shape: use layout='channel' for variable sequence lengths"
            )
        if config.top_n > values.shape[1]:
            raise ConfigError(
                f"InhibitionConfig.top_n: {config.top_n} is larger than the {values.shape[1]} neurons per sample of "
                f"this activation (shape {tuple(shape)}, layout={config.layout!r}); allowed: 1..{values.shape[1]}"
            )
        return values.contiguous()

    def _neuron_shape_of(self, activation: torch.Tensor) -> tuple[int, ...]:
        if self.config.layout == "element":
            return tuple(activation.shape[1:])
        return (activation.shape[-1],) if activation.dim() else (1,)

    @torch.no_grad()
    def _record_first(self, values: torch.Tensor) -> None:
        """No history yet (mu = 0): exact float64 sums; nothing is judged or selected."""
        x = values.detach().double()
        self._add_moments(values.shape[0], x.sum(0), x.square().sum(0))

    @torch.no_grad()
    def _add_moments(self, samples: int, sum_d: torch.Tensor, sum_d2: torch.Tensor) -> None:
        """Pending moments += this call's (a neuron with a non-finite value in the call skips it)."""
        rows = self.pending[P_COUNT : P_SUM_D2 + 1]
        rows.copy_(maybe_compiled(accumulate_moments, self.config.execution.kernel)(rows, samples, sum_d, sum_d2))
        self._has_pending = True

    @torch.no_grad()
    def _count_selections(self, neuron_index: torch.Tensor, inhibiting: bool) -> None:
        """This rank's window: times each neuron was selected (and inhibited) += this call's."""
        ones = torch.ones(neuron_index.numel(), dtype=torch.float64, device=neuron_index.device)
        self.window[W_SELECTED].index_add_(0, neuron_index, ones)
        if inhibiting:
            self.window[W_INHIBITED].index_add_(0, neuron_index, ones)

    def _fold(
        self, values: torch.Tensor, track: bool, rewrite: bool, select_above: torch.Tensor | None, inhibiting: bool
    ) -> Measurement | None:
        """The local fused path: measure the call AND merge it into the history as one batch in
        one native pass (trackers, moments, Lemma 3.2 with the forget step, threshold update),
        exactly what ``_record`` followed by the next call's merge does, without the per-neuron
        intermediates. Applies to ``stats_update="call"`` outside a distributed run (there the
        call's moments must first be all-reduced) with the native kernel; None elsewhere.
        ``_prev_mean`` then holds the history mean the call was judged against; the
        selections are counted in the window (times selected, and inhibited when ``inhibiting``),
        and the ``calls`` and ``batches`` buffers are written in the same native call.

        Every line here runs on every training call, between layers that have just evicted
        the caches, where each extra torch op or Python detour costs tens of microseconds:
        buffers are read from ``_buffers`` directly and no autograd mode is entered (no tensor
        op here records a graph)."""
        config = self.config
        if config.stats_update != "call" or self._has_pending or config.execution.kernel not in ("auto", "native"):
            return None
        if _dist_initialized() and self._distributed():
            return None
        buffers = self._buffers
        mean, var = buffers["mean"], buffers["var"]
        neurons = mean.numel()
        if self._compensation is None:
            self._compensation = config.eps * float(var.sum(dtype=torch.float64)) / max(neurons, 1)
        if self._prev_mean is None:
            self._prev_mean = torch.empty_like(mean)
        samples = values.shape[0]
        fused = native_fold(
            FoldCall(
                values=values.detach(),
                mean=mean,
                var=var,
                count=buffers["count"],
                window=buffers["window"],
                prev_mean=self._prev_mean,
                compensation=self._compensation,
                top_n=config.top_n,
                sqrt_threshold=math.sqrt(config.ms_threshold),
                track=track,
                copy=rewrite,
                select_threshold=None if select_above is None else float(select_above),
                capped=self._batches >= config.forget_steps,
                forget_steps=config.forget_steps,
                count_offset=self._lazy_count,
                all_counted=self._all_counted,
                window_rows=_FOLD_WINDOW_ROWS,
                count_rows=(W_SELECTED, W_INHIBITED if inhibiting else -1),
                reuse=self._copy_slot.tensor if config.execution.reuse_buffers else None,
                delta=config.delta if inhibiting and config.mode == "l2e" else None,
                counters=(buffers["calls"], self._calls, buffers["batches"]),
            )
        )
        if fused is None:
            return None
        neuron_index, flat_index, copied, buffer, var_sum, merged, terms = fused
        if config.execution.reuse_buffers and buffer is not None:
            self._copy_slot.tensor = buffer
        self._lazy_count += samples
        self._lazy_ms_n += samples
        if track:
            self._lazy_tracked += samples
        flat = select_above is not None
        if flat:
            with torch.no_grad():
                above = torch.tensor(float(flat_index.numel()), dtype=torch.float64)
                judged = torch.tensor(float(samples * neurons), dtype=torch.float64)
                self.tau.copy_(threshold_update(self.tau, above, judged, config.fraction, config.threshold_rate))
            self._select_above = None
        self._all_counted = self._all_counted or merged == neurons
        if merged > 0:
            self._batches += 1  # (the buffer was incremented by the kernel)
        self._scale = None
        self._compensation = config.eps * var_sum / max(neurons, 1)
        selected = flat_index if flat else neuron_index.view(samples, config.top_n)
        return Measurement(
            None, None, selected, None, None, copied, flat, flat_index, neuron_index, counted=True, terms=terms
        )

    def _distributed(self) -> bool:
        return distributed_world(self.process_group) is not None

    @torch.no_grad()
    def _record(self, samples: int, measured: Measurement) -> None:
        """Pending moments (and threshold counts) and this rank's snapshot trackers += one call's measurements."""
        assert self._scale is not None and measured.sum_d is not None and measured.sum_d2 is not None
        window = self.window
        if measured.flat:
            self.tau_pending[T_ABOVE] += measured.selected.numel()
            self.tau_pending[T_JUDGED] += samples * self.neurons
        native = bookkeeping(self.pending, self.config.execution.kernel)
        if native is not None and measured.sum_d.dtype == measured.sum_d2.dtype == torch.float32:
            native.record_moments(
                self.pending,
                window,
                measured.sum_d,
                measured.sum_d2,
                self._scale,
                samples,
                W_MS_SUM,
                W_MS_N,
                measured.max_scaled,
                measured.above,
                W_ABOVE,
                W_TRACKED,
                W_MS_MAX,
            )
            self._has_pending = True
            return
        self._add_moments(samples, measured.sum_d, measured.sum_d2)
        # sum of phi over the call's samples = sum of d^2 * scale^2 (scale = 1/sqrt(denominator))
        finite = torch.isfinite(measured.sum_d2)
        window[W_MS_SUM].addcmul_(torch.where(finite, measured.sum_d2, 0.0), self._scale.square())
        window[W_MS_N].add_(finite.to(torch.float64), alpha=samples)
        if measured.max_scaled is not None and measured.above is not None:
            window[W_ABOVE] += measured.above
            window[W_TRACKED] += samples
            squared = torch.nan_to_num(measured.max_scaled.double().square(), nan=0.0)
            torch.maximum(window[W_MS_MAX], squared, out=window[W_MS_MAX])

    # ----------------------------------------------------------------------------------
    # the payload: merging pending statistics (memel.sync / the group, through sync.py)
    @property
    def payload_size(self) -> int:
        """Float64 numbers this module adds to the sync collective: count, sum d and sum d^2
        per neuron, then (threshold selection) the values above tau and the values judged."""
        return PAYLOAD_ROWS * self.held_neurons + (TAU_PENDING if self.config.by_threshold else 0)

    def _payload(self) -> torch.Tensor:
        """This rank's pending numbers that add up across ranks, flat (``payload_size`` of them;
        may be a view of ``pending``)."""
        moments = self.pending[:PAYLOAD_ROWS].reshape(-1)
        return torch.cat([moments, self.tau_pending]) if self.config.by_threshold else moments

    @torch.no_grad()
    def write_payload(self, out: torch.Tensor) -> None:
        """Copy this rank's pending numbers into ``out`` (flat float64, ``payload_size`` long),
        the module's part of the buffer that sync all-reduces."""
        moments = PAYLOAD_ROWS * self.held_neurons
        out[:moments].copy_(self.pending[:PAYLOAD_ROWS].reshape(-1))
        if self.config.by_threshold:
            out[moments:].copy_(self.tau_pending)

    def merge_pending(self) -> None:
        """Merge this rank's pending statistics into the history as one batch (no collective)."""
        if self._has_pending:
            self.apply_payload(self._payload())  # read in full before pending is cleared

    @torch.no_grad()
    def apply_payload(self, flat: torch.Tensor) -> None:
        """Merge a flat payload (this rank's, or the sum over the ranks of its group, laid out as
        ``write_payload`` writes it) into the history as one batch (moments, then the threshold
        update) and clear pending."""
        held = self.held_neurons
        payload = flat[: PAYLOAD_ROWS * held].view(PAYLOAD_ROWS, held)
        self._flush_lazy()  # the merge weighs the history by its true count
        if self.config.by_threshold:
            counts = flat[PAYLOAD_ROWS * held :]
            config = self.config
            self.tau.copy_(
                threshold_update(self.tau, counts[T_ABOVE], counts[T_JUDGED], config.fraction, config.threshold_rate)
            )
            self._select_above = None
        # a sharded rank holds part of the counts: whether the batch counts is known from all of them
        counted = bool(self.pending_counted > 0) if self._shard is not None else bool((payload[P_COUNT] > 0).any())
        if counted:
            capped = self._batches >= self.config.forget_steps
            native = bookkeeping(self.mean, self.config.execution.kernel)
            if native is not None:
                native.merge_moments(
                    self.mean, self.var, self.count, payload.contiguous(), capped, self.config.forget_steps
                )
            else:
                merge = maybe_compiled(merge_payload, self.config.execution.kernel)
                mean, var, count = merge(self.mean, self.var, self.count, payload, capped, self.config.forget_steps)
                self.mean.copy_(mean)
                self.var.copy_(var)
                self.count.copy_(count)
            self._batches += 1
            self.batches.fill_(self._batches)
            self._scale = None
        self.pending.zero_()
        self.tau_pending.zero_()
        if self._shard is not None:
            self.pending_counted.zero_()
        self._has_pending = False

    def attach_reduction(self, reduction: PendingReduction | None) -> None:
        """An asynchronous sync in flight whose result this module applies before its next use
        (None: it has landed)."""
        self._reduction = reduction

    def finish_reduction(self) -> None:
        """Wait for an asynchronous sync in flight, if any, and apply its result."""
        if self._reduction is not None:
            self._reduction.wait()

    def settle(self) -> None:
        """Bring every buffer up to date before it is read: a pending asynchronous sync
        applied, lazily kept increments added."""
        self.finish_reduction()
        self._flush_lazy()

    # ----------------------------------------------------------------------------------
    # mode l2e: the loss
    def auxiliary_loss(self) -> torch.Tensor | None:
        """``l2e_weight`` * mean over the values selected (after the late start) in the training
        calls since the last call of log((z - mu)^2 + delta), with autograd to z (mu is the
        pre-call history mean, a constant); None when there is none. Forgets what it returns.

        Minimising it pulls each selected value towards its neuron's mean (the gradient is
        2*(z - mu)/((z - mu)^2 + delta)): it reduces the values' Monosemantic Scale.
        """
        if self._loss_sum is None or self._loss_count == 0:
            self._clear_loss()
            return None
        loss = self._loss_sum * (self.config.l2e_weight / self._loss_count)
        self._clear_loss()
        return loss

    def _clear_loss(self) -> None:
        self._loss_sum = None
        self._loss_count = 0

    # ----------------------------------------------------------------------------------
    # reading
    @torch.no_grad()
    def threshold(self) -> float:
        """The current tau of threshold selection, with this rank's pending counts applied
        (as ``statistics()``; in a distributed run call ``memel.sync(model)`` first)."""
        self.settle()
        tau = self.tau
        if self.config.by_threshold and self._has_pending:
            c = self.config
            tau = threshold_update(
                tau, self.tau_pending[T_ABOVE], self.tau_pending[T_JUDGED], c.fraction, c.threshold_rate
            )
        return float(tau)

    @torch.no_grad()
    def _effective(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """History with this rank's pending batch merged in (without changing any state)."""
        self.settle()
        if not self._has_pending:
            return self.mean, self.var, self.count, self._batches
        pending = self.pending
        batch = Moments.from_shifted_sums(pending[P_COUNT], pending[P_SUM_D], pending[P_SUM_D2], self.mean.double())
        mean, var, count = merge_history(
            self.mean, self.var, self.count, self._batches, batch, self.config.forget_steps
        )
        return mean, var, count, self._batches + 1

    def _whole_effective(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``_effective()`` for all the module's neurons: a sharded rank gathers the shards
        (every rank of the group must call it)."""
        mean, var, count, batches = self._effective()
        if self._shard is None:
            return mean, var, count, batches
        rows = torch.stack([mean.double(), var.double(), count.double()])
        whole = all_gather_rows(rows, self.neurons, self.process_group)
        return whole[0].float(), whole[1].float(), whole[2].to(torch.int64), batches

    def _whole_window(self) -> torch.Tensor:
        """A sharded module's snapshot window for all its neurons, laid out as the replicated
        ``window`` (float64 rows ``W_*``), gathered from every rank's shard (one collective)."""
        counts = self.window_counts.double()
        rows = torch.stack(
            [
                counts[S_SELECTED],
                counts[S_INHIBITED],
                self.window_ms_sum,
                counts[S_MS_N],
                counts[S_ABOVE],
                self.window_ms_max.double(),
            ]
        )
        whole = all_gather_rows(rows, self.neurons, self.process_group)
        window = torch.empty(WINDOW_ROWS, self.neurons, dtype=torch.float64, device=rows.device)
        for row, source in zip((W_SELECTED, W_INHIBITED, W_MS_SUM, W_MS_N, W_ABOVE, W_MS_MAX), whole, strict=True):
            window[row] = source
        window[W_TRACKED] = float(self.window_tracked)
        return window

    def _reset_window(self) -> None:
        if self._shard is None:
            self.window.zero_()
            return
        for tensor in (self.window_counts, self.window_ms_sum, self.window_ms_max, self.window_tracked):
            tensor.zero_()

    def statistics(self) -> dict[str, Any]:
        """Per-neuron ``mean``, unbiased ``var`` and ``count`` (neuron-shaped), and ``batches``.

        Covers every training batch seen so far. In a distributed run, call
        ``memel.sync(model)`` first: batches not yet synced are this rank's own. Sharded
        (``execution.shard_statistics``), every rank of the module's group must call it: the
        shards are gathered (one collective).
        """
        if not self.initialized:
            raise RuntimeError("Inhibitor has no statistics yet: it has not seen a training batch")
        mean, var, count, batches = self._whole_effective()
        shape = tuple(self.neuron_shape.tolist())
        return {
            "mean": mean.reshape(shape).clone(),
            "var": var.reshape(shape).clone(),
            "count": count.reshape(shape).clone(),
            "batches": batches,
        }

    @torch.no_grad()
    def monosemantic_scale(self, activation: torch.Tensor) -> torch.Tensor:
        """phi(z) = (z-mu)^2 / (var + eps*mean(var)) of every value against the current
        statistics, in float64 (finite for any finite input), shaped like ``activation``."""
        mean, var, _, _ = self._whole_effective()
        if self.config.layout == "element":
            values = activation.reshape(-1, self.neurons).double()
        else:
            values = activation.reshape(-1, activation.shape[-1]).double()
        if values.shape[1] != self.neurons:
            raise ValueError(f"activation has {values.shape[1]} neurons per sample, this Inhibitor has {self.neurons}")
        phi = (values - mean.double()).square() / variance_denominator(var, self.config.eps)
        return phi.reshape(activation.shape)

    @torch.no_grad()
    def snapshot(self, reset: bool = True, reduce: bool = True) -> Snapshot:
        """Per-neuron mean, var, count, times selected and inhibited, max and mean MS and the
        fraction of samples with MS above ``ms_threshold``, since the last snapshot.

        Mean, var and count cover every batch seen (as ``statistics()``). In a distributed run
        every rank of its ``process_group`` must call it: the trackers are reduced across the
        ranks of that group (two collectives; ``memel.snapshot(model)`` does it for all modules
        at once); call ``memel.sync(model)`` first. Sharded, the window already holds every
        rank's trackers: the shards are gathered (two collectives) and ``reduce`` changes nothing.
        """
        if not self.initialized:
            raise RuntimeError("Inhibitor has no statistics yet: it has not seen a training batch")
        self.settle()
        if self._shard is not None:
            return self.snapshot_from(self._whole_window(), reset)
        window = self.window.clone()
        if reduce:
            reduce_windows([window], self.process_group)
        return self.snapshot_from(window, reset)

    def snapshot_from(self, window: torch.Tensor, reset: bool) -> Snapshot:
        """The snapshot with ``window`` (a copy of ``window``, reduced or not) as its trackers;
        ``reset`` clears this rank's window. Call ``settle()`` before copying the window."""
        mean, var, count, batches = self._whole_effective()
        ms_n = window[W_MS_N]
        tracked = window[W_TRACKED]
        snap = Snapshot(
            mean=mean.clone(),
            var=var.clone(),
            count=count.clone(),
            selected_count=window[W_SELECTED].to(torch.int64),
            inhibited_count=window[W_INHIBITED].to(torch.int64),
            max_ms=window[W_MS_MAX].clamp_max(torch.finfo(torch.float32).max).float(),
            mean_ms=torch.where(ms_n > 0, window[W_MS_SUM] / ms_n.clamp_min(1), 0.0).float(),
            frac_above=torch.where(tracked > 0, window[W_ABOVE] / tracked.clamp_min(1), 0.0).float(),
            batches=batches,
            neuron_shape=tuple(self.neuron_shape.tolist()),
        )
        if reset:
            self._reset_window()
        return snap

    def extra_repr(self) -> str:
        c = self.config
        selection = f"top_n={c.top_n}" if not c.by_threshold else f"select=threshold, fraction={c.fraction:g}"
        return f"mode={c.mode}, strength={c.strength:g}, {selection}, layout={c.layout}, neurons={self.neurons}"
