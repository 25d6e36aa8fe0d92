"""Typed, validated configuration of the inhibition module."""

from __future__ import annotations

import math
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

Mode = Literal["rd", "naive_a", "naive_b", "original"]
Layout = Literal["channel", "element"]
StatsUpdate = Literal["call", "step"]
Kernel = Literal["auto", "eager", "compiled", "native"]

#: Strength D that each naive baseline is equivalent to under z' = -D*z + (mu + D*z).detach().
NAIVE_STRENGTH: dict[str, float] = {"naive_a": 0.0, "naive_b": -1.0}


class InhibitionConfig(BaseModel):
    """How monosemantic neurons are measured and inhibited (arXiv 2312.11560).

    Fields:
        mode: ``rd`` (Reverse Deactivation), ``naive_a`` (output the mean, no gradient),
            ``naive_b`` (output the mean, gradient unchanged) or ``original`` (nothing is
            modified; statistics and Monosemantic Scale are still tracked).
        strength: D in z' = -D*z + (mean + D*z).detach(); used by ``rd`` only.
        top_n: values selected per sample (the top-n Monosemantic Scale among its neurons).
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
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Mode = "rd"
    strength: float = 1.0
    top_n: int = Field(1, ge=1)
    layout: Layout = "channel"
    forget_steps: int = Field(10, ge=1)
    late_start: int | None = Field(None, ge=0)
    eps: float = Field(0.01, ge=0.0)
    ms_threshold: float = Field(9.0, gt=0.0)
    stats_update: StatsUpdate = "call"
    track_every: int = Field(1, ge=1)
    kernel: Kernel = "auto"

    def __init__(self, **data: object) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise ConfigError(describe_validation_error(type(self).__name__, error, type(self).model_fields)) from None

    @field_validator("strength", "eps", "ms_threshold")
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
        return self

    @property
    def effective_strength(self) -> float:
        """The D applied to selected values (naive baselines are D=0 and D=-1)."""
        return NAIVE_STRENGTH.get(self.mode, self.strength)

    @property
    def modifies(self) -> bool:
        """Whether selected values are changed (every mode but ``original``)."""
        return self.mode != "original"

