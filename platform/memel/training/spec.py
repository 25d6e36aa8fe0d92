"""The training-run spec: one validated object, loaded from YAML with dotted overrides."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from memel.errors import ConfigError, describe_validation_error
from memel.inhibition import InhibitionConfig
from memel.spec_loading import apply_overrides, read_tree


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSection(_Section):
    """Which model, and where inhibition goes (a preset of the model, or explicit patterns).

    ``init_from``: fine-tune from the weights of a finished run's checkpoint (its output folder,
    a sweep member's folder or the checkpoint folder; see :mod:`memel.training.init_from`).
    """

    name: str = "byte-0.2m"
    overrides: dict[str, Any] = Field(default_factory=dict)
    preset: str | None = "mlp"
    targets: list[str] = Field(default_factory=list)
    init_from: str | None = Field(None, min_length=1)

    @field_validator("init_from")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """Relative to where the spec is loaded (workers run elsewhere)."""
        return None if value is None else str(Path(value).expanduser().absolute())


class TrainSection(_Section):
    """Optimisation and parallelism. ``global_batch_size`` = workers x micro_batch_size x accumulation.

    ``placement`` is how Ray places the workers on a cluster's nodes: ``PACK`` (as few nodes as
    possible), ``SPREAD`` (across nodes where they have room, else packed), ``STRICT_PACK`` (one
    node) or ``STRICT_SPREAD`` (one worker per node; a run that loses a node then needs another).

    The lr rises linearly over ``warmup_steps``, then stays at ``lr`` (``lr_schedule: constant``) or
    falls along half a cosine to ``min_lr_ratio x lr`` at the last step (``cosine``)."""

    steps: int = Field(100, ge=1)
    global_batch_size: int = Field(16, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    workers: int = Field(2, ge=1)
    zero_stage: int = 2
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    use_gpu: bool = False
    threads_per_worker: int = Field(1, ge=1)
    seed: int = 0
    log_every: int = Field(10, ge=1)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    deepspeed: dict[str, Any] = Field(default_factory=dict)

    @field_validator("zero_stage")
    @classmethod
    def _stage(cls, value: int) -> int:
        if value not in (0, 1, 2, 3):
            raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {value}")
        return value

    @model_validator(mode="after")
    def _batch(self) -> TrainSection:
        per_step = self.workers * self.micro_batch_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} does not divide across workers={self.workers} x "
                f"micro_batch_size={self.micro_batch_size}; use a multiple of {per_step}"
            )
        if self.precision != "fp32" and not self.use_gpu:
            raise ValueError(f"precision={self.precision!r} needs use_gpu: true; on CPU use fp32")
        return self

    @property
    def accumulation(self) -> int:
        return self.global_batch_size // (self.workers * self.micro_batch_size)


class EvalSection(_Section):
    """Held-out evaluation: ``batches`` batches every ``every`` steps (the same batches every time,
    spread evenly over the held-out set, so ``eval/loss`` changes only with the model); ``final``
    batches from the start of the held-out set at the end of the run (``all``: every held-out
    sample once), logged as ``heldout/loss``, ``heldout/accuracy`` (classification) and
    ``heldout/items``. A fine-tune (``model.init_from``) also scores the pretrained weights the
    same way at step 0, as ``init/...``."""

    every: int = Field(50, ge=1)
    batches: int = Field(4, ge=1)
    final: Literal["all"] | int | None = None

    @field_validator("final", mode="before")
    @classmethod
    def _final(cls, value: Any) -> Any:
        if value is None or value == "all" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("use all (every held-out sample once) or a number of batches >= 1")


class TrackingSection(_Section):
    """MLflow: ``uri`` from here, else MLFLOW_TRACKING_URI, else a local store in the output dir."""

    uri: str | None = None
    experiment: str = "memel"
    run_name: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)


class StatsSection(_Section):
    """Per-neuron statistics as Parquet under ``root`` (local path or s3://), every ``every`` steps."""

    enabled: bool = True
    root: str | None = None
    every: int = Field(25, ge=1)


class CheckpointSection(_Section):
    every: int = Field(50, ge=1)
    keep: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0)
    storage: str | None = None
    #: Before each checkpoint, rank 0 waits up to this long for each output (statistics, metrics)
    #: to store what the checkpoint covers; past it the checkpoint is taken with a warning.
    output_wait_s: float = Field(60.0, ge=0)


class TrainSpec(_Section):
    """One training run: model, data, inhibition, optimisation, tracking, statistics, checkpoints."""

    _owner: ClassVar[str] = "spec"
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelSection = ModelSection()
    data: dict[str, Any] = Field(default_factory=lambda: {"kind": "text_lm", "corpus": "shakespeare", "seq_len": 64})
    inhibition: InhibitionConfig | None = InhibitionConfig()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    tracking: TrackingSection = TrackingSection()
    stats: StatsSection = StatsSection()
    checkpoint: CheckpointSection = CheckpointSection()
    output_dir: str | None = None

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise ConfigError(describe_validation_error(self._owner, error, type(self).model_fields)) from None

    @model_validator(mode="after")
    def _model(self) -> TrainSpec:
        from memel.models import preset_targets

        try:  # the model name and its inhibition preset exist
            preset_targets(self.model.name, self.model.preset or "mlp") if not self.model.targets else None
        except ConfigError as error:
            raise ValueError(f"model: {error}") from None
        return self

    @model_validator(mode="after")
    def _preset_settings(self) -> TrainSpec:
        """A preset's implied inhibition settings (``paper``: ``layout: element``) fill fields the
        spec leaves unset; a spec that sets one of them otherwise is refused, naming the field."""
        from memel.models.config import PRESET_SETTINGS

        implied = PRESET_SETTINGS.get(self.model.preset or "", {}) if not self.model.targets else {}
        if not implied or self.inhibition is None:
            return self
        for name, value in implied.items():
            given = getattr(self.inhibition, name)
            if name in self.inhibition.model_fields_set and given != value:
                raise ValueError(
                    f"inhibition.{name}: {given!r} contradicts model.preset {self.model.preset!r}, which inserts as the "
                    f"paper does with {name} {value!r}; set inhibition.{name}: {value} (or leave it out), or use another preset"
                )
        object.__setattr__(self, "inhibition", self.inhibition.model_copy(update=implied))
        return self

    @model_validator(mode="after")
    def _data(self) -> TrainSpec:
        from memel.data import parse

        try:
            parse({**self.data, "batch_size": self.train.micro_batch_size})
        except ConfigError as error:
            raise ValueError(f"data: {error}") from None
        return self

    # ------------------------------------------------------------------------------
    @property
    def out(self) -> Path:
        return Path(self.output_dir or Path("runs") / self.name)

    @property
    def inserted_preset(self) -> str:
        """Where inhibition is inserted, as recorded with the run: the preset's name, or ``custom``
        when ``model.targets`` gives explicit patterns."""
        return "custom" if self.model.targets else self.model.preset or "mlp"

    def fingerprint(self, also_exclude: tuple[str, ...] = ()) -> str:
        """A short hash of what determines the training (not where results go, nor on which nodes);
        ``also_exclude``: top-level fields left out as well (a job's sweep or tune section)."""
        where = {"tracking": True, "stats": True, "output_dir": True, "checkpoint": True, "train": {"placement"}}
        where |= dict.fromkeys(also_exclude, True)
        core = self.model_dump(mode="json", exclude=where)
        if self.train.lr_schedule == "constant":  # min_lr_ratio has no effect: runs keep their names
            for key in ("lr_schedule", "min_lr_ratio"):
                core["train"].pop(key)
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:10]

    @property
    def run_name(self) -> str:
        """Deterministic from the spec: the same spec resumes the same run."""
        return f"{self.name}-{self.fingerprint()}"


def check_init_from(init_from: str | None) -> None:
    """``model.init_from`` names a usable checkpoint (ConfigError naming the field otherwise).

    Checked when a spec or job is loaded, before anything starts; not in the model validator,
    so a finished run's spec stays readable after its pretrained checkpoint is gone."""
    if init_from is not None:
        from .init_from import resolve_init_from

        resolve_init_from(init_from)


def load_spec(path: str | Path | None = None, overrides: list[str] | None = None, **fields: Any) -> TrainSpec:
    """Load a spec from YAML (or defaults), apply ``key.sub=value`` overrides, validate.

    The file and the overrides are read by :mod:`memel.spec_loading` (bounded, strict YAML)."""
    tree = read_tree(path, "spec", "jobs/smoke.yaml") if path is not None else {}
    tree.update(fields)
    spec = TrainSpec(**apply_overrides(tree, overrides))
    check_init_from(spec.model.init_from)
    return spec
