"""Typed, validated configuration of the inhibition module."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from memel.errors import ConfigError, describe_validation_error

Mode = Literal["rd", "naive_a", "naive_b", "original", "l2e"]
Layout = Literal["channel", "element"]
StatsUpdate = Literal["call", "step"]
Kernel = Literal["auto", "eager", "compiled", "native"]
Select = Literal["top_n", "threshold"]

#: Strength D that each naive baseline is equivalent to under z' = -D*z + (mu + D*z).detach().
NAIVE_STRENGTH: dict[str, float] = {"naive_a": 0.0, "naive_b": -1.0}

#: Defaults of the fields that only one ``select`` / ``mode`` uses (a changed value elsewhere is an error).
THRESHOLD_DEFAULTS: dict[str, float] = {"fraction": 0.02, "threshold_rate": 0.05}
L2E_DEFAULTS: dict[str, float] = {"l2e_weight": 1.0, "delta": 1e-6}


def initial_threshold(fraction: float) -> float:
    """The starting tau of threshold selection: the (1 - fraction) quantile of phi for
    Gaussian activations (chi-square with 1 degree of freedom), i.e. z_{1-p/2}^2."""
    return NormalDist().inv_cdf(1.0 - fraction / 2.0) ** 2


class InhibitionConfig(BaseModel):
    """How monosemantic neurons are measured and inhibited (arXiv 2312.11560).

    Fields:
        mode: ``rd`` (Reverse Deactivation), ``naive_a`` (output the mean, no gradient),
            ``naive_b`` (output the mean, gradient unchanged), ``original`` (nothing is
            modified; statistics and Monosemantic Scale are still tracked) or ``l2e``
            (inhibition as a loss, arXiv 2503.23298: the output is the input, and
            ``memel.auxiliary_loss(model)`` returns l2e_weight * mean over the selected values
            of log((z - mean)^2 + delta), to be added to the training loss).
        strength: D in z' = -D*z + (mean + D*z).detach(); used by ``rd`` only.
        select: ``top_n`` (the top-n Monosemantic Scale values of each sample) or
            ``threshold`` (every value with phi >= tau, where tau is one moving threshold per
            module that tracks the (1 - fraction) quantile of phi over all its values).
        top_n: values selected per sample by ``select="top_n"``.
        fraction: p, the fraction of values ``select="threshold"`` aims to select (0 < p < 1).
        threshold_rate: r, the step of the threshold's update per merged batch:
            log tau += clip(r * (observed_fraction - p) / p, -1, 1) (0 < r <= 1).
        l2e_weight: lambda of mode ``l2e`` (> 0).
        delta: the constant inside the log of mode ``l2e`` (> 0; keeps the loss finite).
        layout: ``channel`` (neurons along the last dim; every other index is a sample) or
            ``element`` (samples along dim 0; every other index is its own neuron).
        forget_steps: n_f, batches after which the history weight is capped (Algorithm 1).
        late_start: l_s, batches of statistics required before any value is modified
            (defaults to ``forget_steps``).
        eps: variance compensation: MS = (z-mean)^2 / (var + eps * mean_over_neurons(var)).
        ms_threshold: MS above which a value counts towards ``frac_above`` in snapshots
            (9 = three standard deviations).
        stats_update: ``call`` merges each training call's statistics before the next call
            (the paper's algorithm); ``step`` accumulates calls (gradient-accumulation
            micro-batches) as one batch until ``memel.sync(model)``, once per optimizer step.
        track_every: the per-neuron max MS and fraction above threshold of snapshots are
            measured on every k-th training call (1 = every call); the rest is exact always.
        kernel: ``auto`` (default) is ``native`` for CPU tensors and ``eager`` elsewhere;
            ``eager`` runs the hot path op by op; ``compiled`` fuses its two passes with
            ``torch.compile`` (needs a C++ compiler on CPU; compiles once per shape family);
            ``native`` runs it as one fused C++ pass on CPU (built once on first use and cached;
            falls back to ``eager``, with a warning, where it cannot be built or used).
            Threshold selection is fused in ``native`` too; ``compiled`` runs it eagerly.
        reuse_buffers: with the native kernel, write each call's output copy (and RD's
            gradient) into the buffer of an earlier call once nothing refers to it any more,
            instead of fresh memory, whose page faults are most of the cost of writing an
            activation-sized tensor on CPU. Holds up to two activation-sized buffers per module
            between steps (during a step they are alive anyway); False frees them each time.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = "rd"
    strength: float = 1.0
    select: Select = "top_n"
    top_n: int = Field(1, ge=1)
    fraction: float = Field(THRESHOLD_DEFAULTS["fraction"], gt=0.0, lt=1.0)
    threshold_rate: float = Field(THRESHOLD_DEFAULTS["threshold_rate"], gt=0.0, le=1.0)
    l2e_weight: float = Field(L2E_DEFAULTS["l2e_weight"], gt=0.0)
    delta: float = Field(L2E_DEFAULTS["delta"], gt=0.0)
    layout: Layout = "channel"
    forget_steps: int = Field(10, ge=1)
    late_start: int | None = Field(None, ge=0)
    eps: float = Field(0.01, ge=0.0)
    ms_threshold: float = Field(9.0, gt=0.0)
    stats_update: StatsUpdate = "call"
    track_every: int = Field(1, ge=1)
    kernel: Kernel = "auto"
    reuse_buffers: bool = True

    def __init__(self, **data: object) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise ConfigError(describe_validation_error(type(self).__name__, error, type(self).model_fields)) from None

    @field_validator("strength", "eps", "ms_threshold", "l2e_weight", "delta")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _resolve(self) -> InhibitionConfig:
        if self.late_start is None:
            object.__setattr__(self, "late_start", self.forget_steps)
        if self.mode in NAIVE_STRENGTH and self.strength != 1.0:
            raise ValueError(
                f"strength={self.strength} is only used by mode 'rd'; mode '{self.mode}' is "
                f"fixed at D={NAIVE_STRENGTH[self.mode]:g}: leave strength at 1.0 or use mode 'rd'"
            )
        if self.mode == "l2e" and self.strength != 1.0:
            raise ValueError(
                f"strength={self.strength} is Reverse Deactivation's D (mode 'rd'); mode 'l2e' inhibits "
                "through a loss whose weight is l2e_weight: leave strength at 1.0 and set l2e_weight"
            )
        if self.mode != "l2e":
            for name, default in L2E_DEFAULTS.items():
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name}={getattr(self, name)} is only used by mode 'l2e' (mode is {self.mode!r}): "
                        f"set mode='l2e' or leave {name} at {default:g}"
                    )
        if self.select == "top_n":
            for name, default in THRESHOLD_DEFAULTS.items():
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name}={getattr(self, name)} is only used by select='threshold' (select is 'top_n'): "
                        f"set select='threshold' or leave {name} at {default:g}"
                    )
        elif self.top_n != 1:
            raise ValueError(
                f"top_n={self.top_n} is only used by select='top_n'; select='threshold' picks the values with "
                "phi >= tau (about `fraction` of them): leave top_n at 1 or use select='top_n'"
            )
        return self

    @property
    def effective_strength(self) -> float:
        """The D applied to selected values (naive baselines are D=0 and D=-1)."""
        return NAIVE_STRENGTH.get(self.mode, self.strength)

    @property
    def modifies(self) -> bool:
        """Whether selected values are inhibited (every mode but ``original``; ``l2e`` through the loss)."""
        return self.mode != "original"

    @property
    def by_threshold(self) -> bool:
        """Whether values are selected by the moving threshold (``select="threshold"``)."""
        return self.select == "threshold"
