"""The job spec users submit: one training run, optionally expanded into a sweep or tuned by Optuna.

A job spec is a training-run spec (see ``memel.training.TrainSpec``: model, data, inhibition,
train, eval, tracking, stats, checkpoint) plus two optional sections:

- ``sweep``: the axes of a scale sweep (rungs x modes x strengths x top_n x seeds); every
  combination is one member training run. An empty axis keeps the base spec's value.
- ``tune``: an Optuna study over the inhibition settings (see ``TuneSection``).

Every sweep member is validated when the job is loaded, so a bad rung or a setting that does
not fit one fails before anything starts, naming the member (a top_n larger than a module's
neurons is only known once the model runs: that member fails alone).
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from memel import run_record
from memel.errors import ConfigError
from memel.inhibition.config import Mode
from memel.spec_loading import apply_overrides, read_tree, set_dotted
from memel.training.spec import TrainSpec, _Section, check_init_from

#: The paper's MEmeL-Tune grid (Section 4): top_n x strength.
PAPER_GRID: dict[str, list[float | int]] = {"top_n": [1, 5, 10, 50, 100], "strength": [1, 5, 10, 50, 100]}


class Rung(_Section):
    """A model of the sweep, with settings that only that rung gets (dotted keys, e.g. ``train.lr``)."""

    model: str
    set: dict[str, Any] = Field(default_factory=dict)


class Variant(_Section):
    """An inhibition variant of the sweep: a mode, with settings only it gets (e.g. threshold
    selection for l2e) and a ``name`` for its members (default: the mode)."""

    mode: Mode
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    set: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.mode


class SweepSection(_Section):
    """The axes of a sweep; each member is one combination. Empty axes keep the base value.

    ``modes`` items are a mode name or ``{mode: l2e, name: l2e-threshold, set: {inhibition.select:
    threshold}}``; ``strengths`` only vary ``rd`` (the other modes have a fixed D).
    """

    rungs: list[Rung] = Field(default_factory=list)
    modes: list[Variant] = Field(default_factory=list)
    strengths: list[float] = Field(default_factory=list)
    top_n: list[int] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list)
    max_concurrent: int | None = Field(None, ge=1)

    @field_validator("rungs", mode="before")
    @classmethod
    def _rung_names(cls, value: Any) -> Any:
        if isinstance(value, list):  # a bare name is a rung with no settings of its own
            return [{"model": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("modes", mode="before")
    @classmethod
    def _mode_names(cls, value: Any) -> Any:
        if isinstance(value, list):  # a bare mode is a variant with no settings of its own
            return [{"mode": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("rungs", "modes", "strengths", "top_n", "seeds")
    @classmethod
    def _distinct(cls, value: list[Any]) -> list[Any]:
        """Each axis value once (rungs by model, modes by their variant label)."""
        first = value[0] if value else None
        if isinstance(first, Rung):
            keys, what, fix = [rung.model for rung in value], "a model", "give each rung once"
        elif isinstance(first, Variant):
            keys, what, fix = (
                [v.label for v in value],
                "a value",
                "give each mode once, or name the variants apart (name: ...)",
            )
        else:
            keys, what, fix = list(value), "a value", "give each value once"
        if len(set(keys)) != len(keys):
            raise ValueError(f"lists {what} twice: {keys}; {fix}")
        return value


class FloatRange(_Section):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise ValueError(f"needs finite low <= high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log=true needs low > 0, got low={self.low}")
        return self


class IntRange(_Section):
    low: int
    high: int

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"needs low <= high, got low={self.low}, high={self.high}")
        return self


class SearchSpace(_Section):
    """What a study searches; a field left out keeps the base spec's value.

    ``strength`` is a range (log scale by default); ``top_n``, ``mode`` and ``preset`` are
    choices; ``late_start`` and ``forget_steps`` are integer ranges (batches).
    """

    strength: FloatRange | None = FloatRange(low=0.1, high=100.0, log=True)
    top_n: list[int] | None = None
    mode: list[Mode] | None = None
    preset: list[str] | None = None
    late_start: IntRange | None = None
    forget_steps: IntRange | None = None

    @field_validator("top_n", "mode", "preset")
    @classmethod
    def _non_empty(cls, value: list[Any] | None) -> list[Any] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError(f"needs distinct choices, got {value}; leave the field out to keep the base value")
        return value

    @field_validator("late_start", "forget_steps")
    @classmethod
    def _non_negative(cls, value: IntRange | None) -> IntRange | None:
        if value is not None and value.low < 0:
            raise ValueError(f"needs low >= 0, got {value.low}")
        return value


class TuneSection(_Section):
    """An Optuna study: ``trials`` training runs (in total, over every invocation), ``parallel`` at once.

    ``storage``: an Optuna RDB URL (``sqlite:///...``, ``postgresql://...``, ``mysql://...``) or
    ``journal:///path/file.journal`` (Optuna's journal file storage). Default: SQLite in the
    job's output dir for one trial at a time, a journal file when trials run in parallel
    (SQLite is not safe for parallel writers). ``grid: paper`` runs the paper's 5 x 5 grid of
    top_n x strength (rd) with the grid sampler; otherwise ``sampler`` is TPE unless set.
    """

    trials: int = Field(20, ge=1)
    parallel: int = Field(1, ge=1)
    storage: str | None = None
    study_name: str | None = None
    metric: str = "eval/loss"
    direction: Literal["minimize", "maximize"] = "minimize"
    sampler: Literal["tpe", "random", "grid"] | None = None
    grid: Literal["paper"] | None = None
    pruner: Literal["median", "hyperband", "none"] = "median"
    seed: int = 0
    space: SearchSpace = SearchSpace()

    @field_validator("storage")
    @classmethod
    def _storage_scheme(cls, value: str | None) -> str | None:
        allowed = (
            "sqlite:///",
            "postgresql://",
            "postgresql+psycopg://",
            "postgresql+psycopg2://",
            "mysql://",
            "mysql+pymysql://",
            "journal:///",
        )
        if value is not None and not value.startswith(allowed):
            raise ValueError(f"unsupported storage URL {value!r}; allowed schemes: {', '.join(allowed)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TuneSection:
        if self.sampler is None:  # a grid preset implies the grid sampler, else TPE
            object.__setattr__(self, "sampler", "grid" if self.grid is not None else "tpe")
        if self.grid is not None and self.sampler != "grid":
            raise ValueError(f"grid: {self.grid!r} needs sampler: grid (got sampler: {self.sampler!r})")
        if self.sampler == "grid" and self.grid is None:
            raise ValueError("sampler: grid needs grid: paper (the paper's top_n x strength grid)")
        if self.storage and self.storage.startswith("sqlite:") and self.parallel > 1:
            raise ValueError(
                f"storage {self.storage!r} is SQLite, which is not safe for {self.parallel} parallel trials; "
                "use postgresql://..., mysql://... or journal:///path/study.journal, or parallel: 1"
            )
        return self

    def grid_space(self) -> dict[str, list[Any]]:
        return dict(PAPER_GRID) if self.grid == "paper" else {}


class JobSpec(TrainSpec):
    """A job: the base training run plus an optional ``sweep`` or ``tune`` section."""

    _owner: ClassVar[str] = "job"
    sweep: SweepSection | None = None
    tune: TuneSection | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> JobSpec:
        if self.sweep is not None and self.tune is not None:
            raise ValueError("has both sweep and tune sections; a job is a sweep or a study: split it into two jobs")
        return self

    def base_tree(self) -> dict[str, Any]:
        """The base training run as a plain tree (what members and trials start from)."""
        return self.model_dump(mode="json", exclude={"sweep", "tune"})

    def base_fingerprint(self) -> str:
        """The base training run's fingerprint (what its members and trials start from)."""
        return self.fingerprint(also_exclude=("sweep", "tune"))


class Member(_Section):
    """One training run of a sweep: its axis values (``mode`` is the variant's label) and validated spec."""

    key: str
    rung: str
    mode: str
    strength: float
    top_n: int
    seed: int
    spec: TrainSpec


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(value)).strip("-")


def member_spec(
    job: JobSpec, key: str, overrides: dict[str, Any], where: str, folder: str = run_record.MEMBERS_DIR
) -> TrainSpec:
    """The job's base with dotted overrides applied, named ``<job>-<key>``, in ``<out>/<folder>/<key>``."""
    tree = job.base_tree()
    for dotted, value in overrides.items():
        try:
            set_dotted(tree, dotted, value)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
    tree["name"] = f"{job.name}-{key}"
    tree["output_dir"] = str(job.out / folder / key)
    try:
        return TrainSpec(**tree)
    except ConfigError as error:
        message = str(error).removeprefix("spec.").removeprefix("spec: ").replace("model: model:", "model:")
        raise ConfigError(f"{where}: {message}") from None


def attach(
    spec: TrainSpec, tracking_uri: str, parent_run_id: str, stats_root: str | None, tags: dict[str, str]
) -> TrainSpec:
    """A member or trial wired into its job: the job's tracking store and Parquet root, its parent run, tags."""
    tracking = spec.tracking.model_copy(
        update={"uri": tracking_uri, "parent_run_id": parent_run_id, "tags": {**spec.tracking.tags, **tags}}
    )
    stats = spec.stats.model_copy(update={"root": stats_root}) if stats_root else spec.stats
    return spec.model_copy(update={"tracking": tracking, "stats": stats})


def expand_sweep(job: JobSpec) -> list[Member]:
    """Every member of the job's sweep (one member, the base run, without a sweep section)."""
    base = job.base_tree()
    inhibition = base.get("inhibition") or {}
    sweep = job.sweep or SweepSection()
    rungs = sweep.rungs or [Rung(model=job.model.name)]
    modes = sweep.modes or [Variant.model_construct(mode=inhibition.get("mode", "none"), name=None, set={})]
    strengths = sweep.strengths or [inhibition.get("strength", 1.0)]
    top_ns = sweep.top_n or [inhibition.get("top_n", 1)]
    seeds = sweep.seeds or [job.train.seed]
    if job.inhibition is None and (sweep.modes or sweep.strengths or sweep.top_n):
        raise ConfigError("sweep: modes/strengths/top_n need an inhibition section in the job; add `inhibition: {}`")
    members: list[Member] = []
    for rung, variant, strength, top_n, seed in itertools.product(rungs, modes, strengths, top_ns, seeds):
        mode = variant.mode
        if mode != "rd" and strength != strengths[0]:
            continue  # strength only changes rd: one member per other mode
        overrides: dict[str, Any] = {"model.name": rung.model, "train.seed": seed}
        if job.inhibition is not None:
            overrides |= {"inhibition.mode": mode, "inhibition.top_n": top_n}
            overrides["inhibition.strength"] = strength if mode == "rd" else 1.0
        overrides |= variant.set | rung.set
        parts = [rung.model, variant.label]
        if mode == "rd" and len(strengths) > 1:
            parts.append(f"D{strength:g}")
        if len(top_ns) > 1:
            parts.append(f"n{top_n}")
        if len(seeds) > 1:
            parts.append(f"s{seed}")
        key = "-".join(_slug(part) for part in parts)
        where = f"sweep member {key}"
        spec = member_spec(job, key, overrides, where)
        shown_mode = variant.label if spec.inhibition else "none"
        shown_strength = spec.inhibition.strength if spec.inhibition else 0.0
        shown_top_n = spec.inhibition.top_n if spec.inhibition else 0
        members.append(
            Member(
                key=key,
                rung=rung.model,
                mode=shown_mode,
                strength=shown_strength,
                top_n=shown_top_n,
                seed=seed,
                spec=spec,
            )
        )
    return members


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Load and validate a job spec, with ``dotted.key=value`` overrides (``sweep.seeds=[0,1]``).

    Every sweep member is validated too, so ``load_job`` failing is the only way a job fails
    before it starts.
    """
    tree = read_tree(path, "job", "jobs/quickstart.yaml", empty="a job needs at least a name")
    job = JobSpec(**apply_overrides(tree, overrides))
    members = expand_sweep(job) if job.sweep is not None else []
    for init_from in dict.fromkeys([job.model.init_from, *(m.spec.model.init_from for m in members)]):
        check_init_from(init_from)
    return job


def preflight_job(job: JobSpec, address: str | None = None, connect: bool = True) -> None:
    """Every check a run of ``job`` must pass before it starts: its base run, or each sweep
    member (see :mod:`memel.training.preflight`); a ConfigError names the member and the field."""
    from memel.training.preflight import preflight

    members = [member.spec for member in expand_sweep(job)] if job.sweep is not None else None
    preflight(job, address, connect, members)
    check_job_folders(job)


def check_job_folders(job: JobSpec) -> None:
    """The job's output folder (and a sweep's member folders) hold nothing of another spec
    (``memel.training.output_dir``); the run checks it again, under its lock."""
    from memel.training.output_dir import check_output_dir, run_claim

    if job.tune is not None:
        from .study import study_claim

        check_output_dir(job.out.resolve(), claim=study_claim(job, job.tune))
    elif job.sweep is not None:
        from .sweep_folders import check_folders

        check_folders(job)
    else:
        check_output_dir(job.out.resolve(), claim=run_claim(f"{job.name}-{job.base_fingerprint()}"))
