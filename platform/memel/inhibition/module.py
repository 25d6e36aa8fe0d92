"""The Inhibitor module: tracks per-neuron statistics and inhibits monosemantic values."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .config import ConfigError, InhibitionConfig
from .kernels import CallAnalysis, ReverseDeactivation, analyse_call, flat_selection
from .statistics import Moments, merge_history, variance_denominator

# Rows of the ``pending`` buffer: what this rank measured since the last merge.
P_COUNT, P_MEAN, P_M2, P_SELECTED, P_INHIBITED, P_MS_SUM, P_MS_N, P_ABOVE, P_TRACKED, P_MS_MAX = range(10)
PENDING_ROWS = 10
# Rows of the ``window`` buffer: what happened since the last snapshot (global once synced).
W_SELECTED, W_INHIBITED, W_MS_SUM, W_MS_N, W_ABOVE, W_TRACKED, W_MS_MAX = range(7)
WINDOW_ROWS = 7
#: Rows of ``pending`` that are summed across ranks by ``sync`` (moments travel as shifted sums).
SUMMED_ROWS = (P_SELECTED, P_INHIBITED, P_MS_SUM, P_MS_N, P_ABOVE, P_TRACKED)
PAYLOAD_ROWS = 3 + len(SUMMED_ROWS)


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
        return {key: value.cpu().numpy() if isinstance(value, torch.Tensor) else value for key, value in vars(self).items()}


class Inhibitor(nn.Module):
    """Monosemantic Scale tracking and Reverse Deactivation for one activation.

    Has no parameters. In eval mode it is an exact identity. In training mode each call
    (1) merges the statistics of earlier calls that are still pending (``stats_update="call"``),
    (2) computes every value's Monosemantic Scale against the history, which excludes this
    call, (3) selects the top-n values of each sample and, once the history holds
    ``late_start`` batches, modifies them according to ``mode``, and (4) records the call's
    moments as pending. All state lives in buffers, so it travels with ``state_dict``.
    """

    mean: torch.Tensor
    var: torch.Tensor
    count: torch.Tensor
    batches: torch.Tensor
    calls: torch.Tensor
    neuron_shape: torch.Tensor
    pending: torch.Tensor
    window: torch.Tensor

    def __init__(self, config: InhibitionConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = InhibitionConfig(**overrides)
        elif overrides:
            config = InhibitionConfig(**{**config.model_dump(), **overrides})
        self.config = config
        self._register_state(0, ())
        self._batches = 0
        self._calls = 0
        self._has_pending = False
        self._group: Any = None  # set by memel.inhibit: the modules synced together
        self._inflight: Any = None  # an asynchronous sync whose result is not applied yet

    # ----------------------------------------------------------------------------------
    # state
    def _register_state(self, neurons: int, shape: tuple[int, ...], device: torch.device | str = "cpu") -> None:
        def f32() -> torch.Tensor:
            return torch.zeros(neurons, dtype=torch.float32, device=device)

        self.register_buffer("mean", f32())
        self.register_buffer("var", f32())
        self.register_buffer("count", torch.zeros(neurons, dtype=torch.int64, device=device))
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("neuron_shape", torch.tensor(shape, dtype=torch.int64, device=device))
        self.register_buffer("pending", torch.zeros(PENDING_ROWS, neurons, dtype=torch.float64, device=device))
        self.register_buffer("window", torch.zeros(WINDOW_ROWS, neurons, dtype=torch.float64, device=device))

    @property
    def initialized(self) -> bool:
        """Whether the module has seen a training call (and so knows its neuron count)."""
        return self.mean.numel() > 0

    @property
    def neurons(self) -> int:
        return self.mean.numel()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Inhibitor:
        # model.half()/bfloat16() must not lower the statistics' precision: keep dtypes, follow devices.
        kept = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():
            old = kept.get(name)
            if buffer is not None and old is not None and buffer.dtype != old.dtype:
                self._buffers[name] = old.to(device=buffer.device)
        return self

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        self._finish_inflight()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        incoming = state_dict.get(prefix + "mean")
        shape_key = prefix + "neuron_shape"
        if incoming is not None and incoming.numel() != self.neurons and shape_key in state_dict:
            shape = tuple(int(v) for v in state_dict[shape_key].tolist())
            self._register_state(incoming.numel(), shape, self.mean.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._batches = int(self.batches.item())
        self._calls = int(self.calls.item())
        self._has_pending = bool(self.neurons) and bool((self.pending[P_COUNT] > 0).any().item())

    # ----------------------------------------------------------------------------------
    # forward
    def forward(self, activation: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return activation
        self._finish_inflight()
        if self._has_pending and self.config.stats_update == "call":
            if self._group is not None:
                self._group.flush()
            else:
                from .sync import sync_inhibitors

                sync_inhibitors([self])
        values = self._as_samples(activation)
        if not self.initialized:
            self._register_state(values.shape[1], self._neuron_shape_of(activation), activation.device)
        analysis = self._analyse(values)
        output = values
        inhibiting = analysis.selected is not None and self.config.modifies and self._batches >= self.config.late_start
        if inhibiting:
            assert analysis.selected is not None
            flat_index = flat_selection(analysis.selected, values.shape[1])
            replacement = self.mean.index_select(0, analysis.selected.reshape(-1))
            output = ReverseDeactivation.apply(values, flat_index, replacement, self.config.effective_strength)
        self._record(analysis, inhibiting)
        if output is values:
            return activation
        return output.view(activation.shape)

    def _as_samples(self, activation: torch.Tensor) -> torch.Tensor:
        if not activation.is_floating_point():
            raise TypeError(f"Inhibitor expects a floating-point activation, got {activation.dtype}")
        if self.config.layout == "element":
            if activation.dim() < 2:
                raise ValueError(
                    f"layout='element' needs an activation of shape [batch, ...] with at least 2 dims, "
                    f"got shape {tuple(activation.shape)}; use layout='channel'"
                )
            values = activation.reshape(activation.shape[0], -1)
        else:
            values = activation.reshape(-1, activation.shape[-1]) if activation.dim() else activation.reshape(1, 1)
        if self.initialized:
            shape = self._neuron_shape_of(activation)
            if values.shape[1] != self.neurons or shape != tuple(self.neuron_shape.tolist()):
                raise ValueError(
                    f"Inhibitor(layout={self.config.layout!r}) was set up for neurons of shape "
                    f"{tuple(self.neuron_shape.tolist())}, got an activation of shape {tuple(activation.shape)} "
                    f"(neurons {shape}); with layout='element' every batch needs the same per-sample shape: "
                    "use layout='channel' for variable sequence lengths"
                )
        top_n = self.config.top_n
        if top_n > values.shape[1]:
            raise ConfigError(
                f"InhibitionConfig.top_n: {top_n} is larger than the {values.shape[1]} neurons per sample of this "
                f"activation (shape {tuple(activation.shape)}, layout={self.config.layout!r}); "
                f"allowed: 1..{values.shape[1]}"
            )
        return values

    def _neuron_shape_of(self, activation: torch.Tensor) -> tuple[int, ...]:
        if self.config.layout == "element":
            return tuple(activation.shape[1:])
        return (activation.shape[-1],) if activation.dim() else (1,)

    def _analyse(self, values: torch.Tensor) -> CallAnalysis:
        self._calls += 1
        self.calls.fill_(self._calls)
        track = (self._calls - 1) % self.config.track_every == 0
        if self._batches == 0:
            return analyse_call(values, None, None, self.config.top_n, 0.0, track)
        denominator = variance_denominator(self.var, self.config.eps)
        inv_sqrt = denominator.rsqrt().float()
        return analyse_call(values, self.mean, inv_sqrt, self.config.top_n, math.sqrt(self.config.ms_threshold), track)

    @torch.no_grad()
    def _record(self, analysis: CallAnalysis, inhibiting: bool) -> None:
        pending = self.pending
        merged = Moments(pending[P_COUNT], pending[P_MEAN], pending[P_M2]).combine(analysis.moments)
        pending[P_COUNT].copy_(merged.count)
        pending[P_MEAN].copy_(merged.mean)
        pending[P_M2].copy_(merged.m2)
        self._has_pending = True
        if analysis.selected is None:
            return
        hits = torch.bincount(analysis.selected.reshape(-1), minlength=self.neurons).to(torch.float64)
        pending[P_SELECTED] += hits
        if inhibiting:
            pending[P_INHIBITED] += hits
        assert analysis.ms_sum is not None
        pending[P_MS_SUM] += analysis.ms_sum
        pending[P_MS_N] += analysis.moments.count
        if analysis.ms_max is not None and analysis.above is not None:
            pending[P_ABOVE] += torch.where(analysis.moments.count > 0, analysis.above, 0.0)
            pending[P_TRACKED] += analysis.moments.count
            torch.maximum(pending[P_MS_MAX], torch.nan_to_num(analysis.ms_max, nan=0.0), out=pending[P_MS_MAX])

    # ----------------------------------------------------------------------------------
    # merging pending statistics (called by memel.sync / the group)
    def _sync_payload(self) -> torch.Tensor:
        """This rank's pending statistics as rows that add up across ranks: count, sums of
        (x - mean) and (x - mean)^2 about the shared history mean, then the summed trackers."""
        pending = self.pending
        moments = Moments(pending[P_COUNT], pending[P_MEAN], pending[P_M2])
        sum_shifted, sumsq_shifted = moments.shifted_sums(self.mean.double())
        return torch.cat(
            [pending[P_COUNT : P_COUNT + 1], sum_shifted[None], sumsq_shifted[None], pending[list(SUMMED_ROWS)]]
        )

    @torch.no_grad()
    def _apply_payload(self, payload: torch.Tensor) -> None:
        """Merge a (global) payload into the history as one batch and clear pending."""
        count, sum_shifted, sumsq_shifted = payload[0], payload[1], payload[2]
        if bool((count > 0).any()):
            batch = Moments.from_shifted_sums(count, sum_shifted, sumsq_shifted, self.mean.double())
            mean, var, total = merge_history(
                self.mean, self.var, self.count, self._batches, batch, self.config.forget_steps
            )
            self.mean.copy_(mean)
            self.var.copy_(var)
            self.count.copy_(total)
            self._batches += 1
            self.batches.fill_(self._batches)
        window = self.window
        for offset, row in enumerate(SUMMED_ROWS):
            window[_WINDOW_OF[row]] += payload[3 + offset]
        torch.maximum(window[W_MS_MAX], self.pending[P_MS_MAX], out=window[W_MS_MAX])
        self.pending.zero_()
        self._has_pending = False

    def _finish_inflight(self) -> None:
        if self._inflight is not None:
            self._inflight.wait()

    # ----------------------------------------------------------------------------------
    # reading
    @torch.no_grad()
    def _effective(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """History with this rank's pending batch merged in (without changing any state)."""
        self._finish_inflight()
        if not self._has_pending:
            return self.mean, self.var, self.count, self._batches
        pending = self.pending
        batch = Moments(pending[P_COUNT].clone(), pending[P_MEAN].clone(), pending[P_M2].clone())
        mean, var, count = merge_history(self.mean, self.var, self.count, self._batches, batch, self.config.forget_steps)
        return mean, var, count, self._batches + 1

    def statistics(self) -> dict[str, Any]:
        """Per-neuron ``mean``, unbiased ``var`` and ``count`` (neuron-shaped), and ``batches``.

        Covers every training batch seen so far. In a distributed run, call
        ``memel.sync(model)`` first: batches not yet synced are this rank's own.
        """
        if not self.initialized:
            raise RuntimeError("Inhibitor has no statistics yet: it has not seen a training batch")
        mean, var, count, batches = self._effective()
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
        mean, var, _, _ = self._effective()
        values = activation.reshape(-1, self.neurons).double() if self.config.layout == "element" else activation.reshape(-1, activation.shape[-1]).double()
        if values.shape[1] != self.neurons:
            raise ValueError(f"activation has {values.shape[1]} neurons per sample, this Inhibitor has {self.neurons}")
        phi = (values - mean.double()).square() / variance_denominator(var, self.config.eps)
        return phi.reshape(activation.shape)

    @torch.no_grad()
    def snapshot(self, reset: bool = True, reduce: bool = True) -> Snapshot:
        """Per-neuron mean, var, count, times selected and inhibited, max and mean MS and the
        fraction of samples with MS above ``ms_threshold``, since the last snapshot.

        In a distributed run every rank must call it (the max MS is reduced across ranks
        when ``reduce``); call ``memel.sync(model)`` first. ``memel.snapshot(model)`` does
        this for all modules with one collective.
        """
        if not self.initialized:
            raise RuntimeError("Inhibitor has no statistics yet: it has not seen a training batch")
        from .sync import distributed_world, reduce_max

        window = self.window.clone()
        if distributed_world() is None:
            pending = self.pending
            for row in SUMMED_ROWS:
                window[_WINDOW_OF[row]] += pending[row]
            torch.maximum(window[W_MS_MAX], pending[P_MS_MAX], out=window[W_MS_MAX])
        elif reduce:
            reduce_max([window[W_MS_MAX]])
        return self._snapshot_from(window, reset)

    def _snapshot_from(self, window: torch.Tensor, reset: bool) -> Snapshot:
        mean, var, count, batches = self._effective()
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
            self.window.zero_()
            if _is_local():
                self.pending[list(SUMMED_ROWS)] = 0
                self.pending[P_MS_MAX] = 0
        return snap

    def extra_repr(self) -> str:
        c = self.config
        return f"mode={c.mode}, strength={c.strength:g}, top_n={c.top_n}, layout={c.layout}, neurons={self.neurons}"


_WINDOW_OF = {
    P_SELECTED: W_SELECTED,
    P_INHIBITED: W_INHIBITED,
    P_MS_SUM: W_MS_SUM,
    P_MS_N: W_MS_N,
    P_ABOVE: W_ABOVE,
    P_TRACKED: W_TRACKED,
}


def _is_local() -> bool:
    from .sync import distributed_world

    return distributed_world() is None
