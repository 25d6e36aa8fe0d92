"""The per-worker side of a run that Ray Train starts on every data-parallel rank.

Each worker builds the model and its data shard, inserts the Inhibitors (statistics
accumulate over the micro-batches of a step and are all-reduced once per optimizer step),
wraps everything with ``deepspeed.initialize``, restores the last checkpoint if Ray has one,
and hands the engine to the :class:`~memel.training.trainer.Trainer`. Rank 0 holds the
outputs (MLflow, Parquet statistics, Optuna pruning, console progress); every rank reports
checkpoints to Ray Train.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import memel
from memel import run_record
from memel.data import build as build_loader
from memel.errors import NonFiniteLossError
from memel.models import build as build_model
from memel.models import preset_targets

from .callbacks import (
    STEP_TIMES_ENV,
    Callback,
    ConsoleProgress,
    FaultInjector,
    PruningCallback,
    StepTimer,
    TrackerCallback,
    say,
)
from .checkpoint_pruning import PruneUnrecorded
from .checkpoint_scan import RunFolder, newest_checkpoint, run_folder
from .checkpointing import Checkpointing
from .deepspeed_config import deepspeed_config
from .evaluation import HeldoutEvaluation
from .lr_schedule import build_scheduler
from .spec import TrainSpec
from .trainer import Schedule, Trainer, TrainState
from .trial import TrialConfig

#: The key of rank 0's return value that says the run diverged.
DIVERGED = "diverged"


@dataclass
class RunInfo:
    """What the driver tells every worker beyond the spec."""

    run_id: str | None
    tracking_uri: str | None
    stats_root: str | None
    n_params: int
    extra_tags: dict[str, str] = field(default_factory=dict)
    #: The Optuna trial this run is: rank 0 reports every evaluation to it and the run stops
    #: early when the study's pruner says so.
    trial: TrialConfig | None = None

    @classmethod
    def from_dict(cls, tree: Mapping[str, Any]) -> RunInfo:
        """Back from ``dataclasses.asdict`` (how it travels in Ray Train's loop config)."""
        trial = tree.get("trial")
        return cls(**{**tree, "trial": TrialConfig(**trial) if isinstance(trial, Mapping) else trial})


def insert_inhibition(model: torch.nn.Module, spec: TrainSpec) -> dict[str, memel.Inhibitor]:
    """Inhibitors at the spec's targets, accumulating statistics per optimizer step."""
    if spec.inhibition is None:
        return {}
    targets = spec.model.targets or preset_targets(spec.model.name, spec.model.preset or "mlp")
    config = spec.inhibition.model_copy(update={"stats_update": "step"})
    return memel.inhibit(model, targets, config)


def module_depths(model: torch.nn.Module, inserted: dict[str, Any]) -> dict[str, float]:
    """Relative depth (0 = first module, 1 = last) of each inserted module in the model."""
    order = [name for name, _ in model.named_modules()]
    positions = sorted(inserted, key=order.index)
    span = max(len(order) - 1, 1)
    return {name: order.index(name) / span for name in positions}


def _quiet_per_report_logs() -> None:
    """Ray Train logs every report (with all its metrics) and every checkpoint at INFO on every
    rank; memel prints its own progress, so those go to WARNING."""
    import logging

    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:  # a Ray version that moved them: keep its logging as it is
        return
    for module in (context, storage):
        for name in (module.__name__, module.__file__):
            logging.getLogger(name).setLevel(logging.WARNING)


class RayReport(Callback):
    """Reports every checkpoint (with the latest metrics) to Ray Train, on every rank; rank 0
    keeps the metrics in the checkpoint too (what a rerun returns when it is the last one)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_checkpoint(self, step: int, directory: Path, metrics: Mapping[str, Any]) -> None:
        import ray.train

        if self.rank == 0:
            run_record.report_path(directory).write_text(json.dumps(dict(metrics)))
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(str(directory)))


def schedule(spec: TrainSpec) -> Schedule:
    """The spec's steps, logging, evaluation, snapshot and checkpoint intervals."""
    return Schedule(
        steps=spec.train.steps,
        accumulation=spec.train.accumulation,
        log_every=spec.train.log_every,
        eval_every=spec.eval.every,
        stats_every=spec.stats.every,
        checkpoint_every=spec.checkpoint.every,
        evaluate_initial=spec.model.init_from is not None,
        evaluate_final=spec.eval.final is not None,
    )


def callbacks(
    spec: TrainSpec,
    info: RunInfo,
    depths: dict[str, float],
    rank: int,
    world: int,
    after_report: Callback | None = None,
) -> list[Callback]:
    """Every rank: fault injection, Ray reports and ``after_report`` (after each checkpoint is reported);
    rank 0 also progress, MLflow, Parquet, Optuna pruning and, when ``MEMEL_STEP_TIMES_FILE``
    is set, step timing."""
    found: list[Callback] = [FaultInjector(rank, world)]
    if rank == 0 and os.environ.get(STEP_TIMES_ENV):
        found.insert(0, StepTimer(os.environ[STEP_TIMES_ENV]))
    if rank == 0:
        found.append(
            ConsoleProgress(spec.train.steps, "tokens" if spec.data.get("kind", "text_lm") == "text_lm" else "items")
        )
        if (
            spec.stats.enabled
            and info.stats_root is not None
            and info.run_id is not None
            and spec.inhibition is not None
        ):
            found.append(_stats_sink(spec, info, depths))  # before tracking: tables go out first, as before
        if info.run_id is not None and info.tracking_uri is not None:
            from memel.tracking import MlflowTracker

            tracker = MlflowTracker(info.tracking_uri, spec.tracking.experiment, run_id=info.run_id)
            tracker.start()
            # the driver ends the run; this rank only sends what it logged
            found.append(TrackerCallback(tracker, checkpoint_wait=spec.checkpoint.output_wait_s))
        if info.trial is not None:
            found.append(PruningCallback(info.trial))
    found.append(RayReport(rank))  # what a checkpoint covers is stored before Ray records it
    if after_report is not None:
        found.append(after_report)
    return found


def _pruning(spec: TrainSpec, run: RunFolder | None, untracked: list[str] | None, rank: int) -> Callback | None:
    """The pruning of the checkpoints Ray does not track (``checkpoint.keep``), when there are any: on every
    rank, which all wait for each checkpoint to be reported before rank 0 prunes."""
    if run is None or not untracked:
        return None
    return PruneUnrecorded(run, spec.train.workers, spec.checkpoint.keep, untracked, rank)


def _stats_sink(spec: TrainSpec, info: RunInfo, depths: dict[str, float]) -> Callback:
    from memel.stats import ParquetStatsSink

    from .callbacks.parquet import RunColumns, StatsSinkCallback

    inhibition = spec.inhibition
    assert inhibition is not None
    columns = RunColumns(
        run_id=info.run_id,
        model=spec.model.name,
        n_params=info.n_params,
        mode=inhibition.mode,
        strength=inhibition.strength,
        top_n=inhibition.top_n,
        seed=spec.train.seed,
        layout=inhibition.layout,
        preset=spec.inserted_preset,
        select=inhibition.select,
    )
    sink = ParquetStatsSink(info.stats_root, info.run_id)
    return StatsSinkCallback(sink, columns, depths, checkpoint_wait=spec.checkpoint.output_wait_s)


def _device(spec: TrainSpec) -> torch.device:
    if not spec.train.use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)
    return device


def diverged(error: NonFiniteLossError) -> dict[str, Any]:
    """What a rank returns when its loss became non-finite: Ray Train would restart a worker that
    raises (``checkpoint.max_failures``) and diverge again, so the driver raises it instead."""
    return {DIVERGED: {"step": error.step, "loss": error.loss, "lr": error.lr}}


def raise_if_diverged(returned: Any) -> None:
    """Raise the NonFiniteLossError a run's rank 0 returned (see :func:`diverged`), if any."""
    found = returned.get(DIVERGED) if isinstance(returned, dict) else None
    if found is not None:
        raise NonFiniteLossError(found["step"], found["loss"], found["lr"])


def train_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's ``train_loop_per_worker``: one data-parallel rank of the run. Returns None, or
    what :func:`diverged` says when the loss became non-finite."""
    import deepspeed  # imported here: a top-level import breaks on CPU-only controllers
    import ray.train

    from .worker_env import load_worker_env

    load_worker_env()  # the driver's secrets, before anything connects to MLflow or S3
    _quiet_per_report_logs()

    spec = TrainSpec(**config["spec"])
    info = RunInfo.from_dict(config["info"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(spec.train.threads_per_worker)
    device = _device(spec)

    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model.name, **spec.model.overrides)
    if spec.model.init_from is not None:  # fine-tuning: the pretrained weights, nothing else
        from .init_from import load_init_weights

        load_init_weights(model, spec.model.init_from)
    inserted = insert_inhibition(model, spec)
    depths = module_depths(model, inserted)
    kind = spec.data.get("kind", "text_lm")
    data = {**spec.data, "batch_size": spec.train.micro_batch_size, "seed": spec.train.seed}
    loader = build_loader(data, rank, world)
    evaluator = HeldoutEvaluation(spec, kind, device, rank, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    scheduler = build_scheduler(optimizer, spec.train)
    deepspeed.init_distributed(dist_backend="nccl" if spec.train.use_gpu else "gloo")
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(spec)
    )
    checkpoints = Checkpointing(engine, inserted, loader, rank, info.run_id)
    state = TrainState()
    # the newest complete checkpoint on disk, even where Ray's record of them lags behind
    storage = config.get("checkpoint_storage")
    run = run_folder(storage, config["run_name"]) if storage else None
    restored = newest_checkpoint(run, world, ray.train.get_checkpoint())
    if restored is not None:
        with restored.as_directory() as directory:
            progress = checkpoints.restore(Path(directory))
        state = TrainState(step=progress["step"], tokens_seen=progress["tokens_seen"])
        if rank == 0:
            say(f"resumed from step {state.step}")

    trainer = Trainer(
        engine,
        loader,
        kind,
        schedule(spec),
        callbacks=callbacks(spec, info, depths, rank, world, _pruning(spec, run, config.get("unrecorded"), rank)),
        evaluator=evaluator,
        checkpointer=checkpoints,
        inserted=inserted,
        device=device,
        default_lr=spec.train.lr,
    )
    try:
        state = trainer.fit(state)
    except NonFiniteLossError as error:  # on every rank at the same step; not a failure Ray Train retries
        return diverged(error)
    if state.stopped:  # every rank got the same decision; the driver tells the study
        if rank == 0:
            say(f"pruned by the study at step {state.step}")
        ray.train.report({**state.metrics, "step": state.step, "tokens_seen": state.tokens_seen, "pruned": 1.0})
    return None
