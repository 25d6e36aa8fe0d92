"""Typed, validated configuration of the inhibition module."""

from __future__ import annotations

import math
from collections.abc import Mapping
from statistics import NormalDist
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
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


class ExecutionConfig(BaseModel):
    """How the inhibition runs: settings that change speed and memory, never what is computed
    (the statistics, selections and outputs are the same under any of them; ``track_every``
    only thins out what snapshots sample).

    Fields:
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
        shard_statistics: each of the W data-parallel ranks holds 1/W of every module's
            per-neuron statistics (history, pending moments, snapshot window) instead of all of
            them: each training call reduce-scatters its moments and window counters into the
            shards and all-gathers the module's mean and variance for that call only. For the
            ``element`` layout of large models (``docs/scaling.md``); one process: no effect.
            A rank's state_dict holds its shard: each rank saves and loads its own.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    track_every: int = Field(1, ge=1)
    kernel: Kernel = "auto"
    reuse_buffers: bool = True
    shard_statistics: bool = False

    def __init__(self, **data: object) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise ConfigError(describe_validation_error(type(self).__name__, error, type(self).model_fields)) from None

    # Only direct construction goes through __init__: validated inside an InhibitionConfig, its
    # errors stay pydantic's, which InhibitionConfig names by the key as it was given.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


#: The execution settings, also accepted (and written by ``model_dump``) as flat keys of InhibitionConfig.
EXECUTION_KEYS: tuple[str, ...] = tuple(ExecutionConfig.model_fields)


class InhibitionConfig(BaseModel):
    """How monosemantic neurons are measured and inhibited (arXiv 2312.11560).

    The algorithm's fields are its own; how it runs is ``execution`` (an ``ExecutionConfig``:
    ``track_every``, ``kernel``, ``reuse_buffers``). Those are accepted as flat keys too
    (``InhibitionConfig(mode="rd", kernel="eager")``, or ``kernel: eager`` beside ``mode`` in
    YAML), win over the same key inside ``execution``, and are readable as attributes
    (``config.kernel``); ``model_dump`` writes them flat, as the YAML form has them, and
    ``model_copy(update={"kernel": ...})`` updates them in ``execution``.

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
        execution: how it runs (``ExecutionConfig``); its keys may be given flat.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

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
    execution: ExecutionConfig = ExecutionConfig()

    #: Every key the config accepts (its fields, and the execution keys given flat).
    accepted_keys: ClassVar[tuple[str, ...]]

    def __init__(self, **data: object) -> None:
        flat = [key for key in EXECUTION_KEYS if key in data]
        try:
            super().__init__(**_nest_execution(data))
        except ValidationError as error:
            named = ValidationError.from_exception_data(
                error.title, [_named_flat(item, flat) for item in error.errors()]
            )
            raise ConfigError(describe_validation_error(type(self).__name__, named, _ERROR_FIELDS)) from None

    @model_validator(mode="before")
    @classmethod
    def _flat_execution_keys(cls, data: Any) -> Any:
        """Flat execution keys moved into ``execution`` (``__init__`` has done it already)."""
        return _nest_execution(data) if isinstance(data, Mapping) else data

    @model_serializer(mode="wrap")
    def _flat_dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The flat form: the execution keys beside the algorithm's (as in YAML job specs)."""
        dumped = handler(self)
        execution = dumped.pop("execution", None)
        if isinstance(execution, dict):
            dumped.update(execution)
            if not dumped.get("shard_statistics", True):  # written only when on (keeps earlier specs' fingerprints)
                del dumped["shard_statistics"]
        return dumped

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> InhibitionConfig:
        """A copy with ``update`` applied (not validated, as pydantic's); flat execution keys
        update ``execution``."""
        if update and any(key in update for key in EXECUTION_KEYS):
            update = dict(update)
            flat = {key: update.pop(key) for key in EXECUTION_KEYS if key in update}
            base = update.get("execution", self.execution)
            update["execution"] = base.model_copy(update=flat)
        return super().model_copy(update=update, deep=deep)

    @property
    def track_every(self) -> int:
        """``execution.track_every``."""
        return self.execution.track_every

    @property
    def kernel(self) -> Kernel:
        """``execution.kernel``."""
        return self.execution.kernel

    @property
    def reuse_buffers(self) -> bool:
        """``execution.reuse_buffers``."""
        return self.execution.reuse_buffers

    @property
    def shard_statistics(self) -> bool:
        """``execution.shard_statistics``."""
        return self.execution.shard_statistics

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


def _nest_execution(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with its flat execution keys moved into ``execution`` (where they win)."""
    data = dict(data)
    flat = {key: data.pop(key) for key in EXECUTION_KEYS if key in data}
    if flat:
        nested = data.get("execution", {})
        if isinstance(nested, ExecutionConfig):
            nested = nested.model_dump(exclude_unset=True)
        data["execution"] = {**nested, **flat} if isinstance(nested, Mapping) else nested
    return data


def _named_flat(item: Any, flat: list[str]) -> Any:
    """One validation error with an execution key that was given flat named flat."""
    loc = tuple(item["loc"])
    if len(loc) >= 2 and loc[0] == "execution" and loc[1] in flat:
        loc = loc[1:]
    details = {"type": item["type"], "loc": loc, "input": item["input"]}
    if "ctx" in item:
        details["ctx"] = item["ctx"]
    return details


#: The fields an error lists where a key is unknown: the flat execution keys among them.
_ERROR_FIELDS = {
    **{name: info for name, info in InhibitionConfig.model_fields.items() if name != "execution"},
    **ExecutionConfig.model_fields,
    "execution": InhibitionConfig.model_fields["execution"],
}
InhibitionConfig.accepted_keys = tuple(_ERROR_FIELDS)
