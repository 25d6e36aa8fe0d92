"""The per-worker training loop that Ray Train runs on every data-parallel rank.

Each worker builds the model and its data shard, inserts the Inhibitors (statistics
accumulate over the micro-batches of a step and are all-reduced once per optimizer step),
wraps everything with ``deepspeed.initialize`` and trains. Rank 0 logs to MLflow and hands
per-neuron snapshots to the Parquet sink; every rank takes part in checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import memel
from memel.data import build as build_loader
from memel.models import build as build_model
from memel.models import preset_targets

from .checkpoint_scan import newest_checkpoint
from .deepspeed_config import deepspeed_config
from .objective import compute
from .spec import TrainSpec

MEMEL_STATE = "memel"
#: Test hook: SIGKILL this worker once at this step (a real crash for fault-tolerance tests).
FAULT_STEP_ENV = "MEMEL_FAULT_KILL_AT_STEP"
FAULT_MARKER_ENV = "MEMEL_FAULT_MARKER"


@dataclass
class RunInfo:
    """What the driver tells every worker beyond the spec."""

    run_id: str | None
    tracking_uri: str | None
    stats_root: str | None
    n_params: int
    extra_tags: dict[str, str] = field(default_factory=dict)
    #: An Optuna trial this run is (storage URL, study name, trial id, metric): rank 0 reports
    #: every evaluation to it and the run stops early when the study's pruner says so.
    trial: dict[str, Any] | None = None


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


class _Checkpointing:
    """DeepSpeed shards plus memel's own state (inhibitors, data position, RNG, run id)."""

    def __init__(self, engine: Any, inserted: dict[str, memel.Inhibitor], loader: Any, rank: int) -> None:
        self.engine, self.inserted, self.loader, self.rank = engine, inserted, loader, rank

    def save(self, directory: Path, step: int, tokens_seen: int, run_id: str | None) -> None:
        tag = f"step-{step:09d}"
        self.engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step, "tokens_seen": tokens_seen})
        state = directory / MEMEL_STATE
        state.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            torch.save({name: m.state_dict() for name, m in self.inserted.items()}, state / "inhibition.pt")
            (state / "progress.json").write_text(json.dumps({"step": step, "tokens_seen": tokens_seen, "run_id": run_id, "tag": tag}))
        (state / f"loader-rank{self.rank}.json").write_text(json.dumps(self.loader.state_dict()))
        torch.save(torch.get_rng_state(), state / f"rng-rank{self.rank}.pt")

    def restore(self, directory: Path) -> dict[str, Any]:
        state = directory / MEMEL_STATE
        progress = json.loads((state / "progress.json").read_text())
        self.engine.load_checkpoint(str(directory), tag=progress["tag"])
        saved = torch.load(state / "inhibition.pt", weights_only=False)
        for name, module in self.inserted.items():
            module.load_state_dict(saved[name])
        loader_file = state / f"loader-rank{self.rank}.json"
        if loader_file.exists():
            self.loader.load_state_dict(json.loads(loader_file.read_text()))
        rng_file = state / f"rng-rank{self.rank}.pt"
        if rng_file.exists():
            torch.set_rng_state(torch.load(rng_file, weights_only=False))
        return progress


def _maybe_inject_fault(step: int, rank: int, world: int) -> None:
    at, marker = os.environ.get(FAULT_STEP_ENV), os.environ.get(FAULT_MARKER_ENV)
    if at is None or marker is None or step != int(at) or rank != world - 1 or Path(marker).exists():
        return
    Path(marker).write_text(f"killed rank {rank} at step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def rank_divergence(inserted: dict[str, memel.Inhibitor], device: torch.device) -> float:
    """Largest difference between ranks of any neuron's mean, var or count (0: all ranks agree)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return 0.0
    parts = [torch.cat([m.mean.double(), m.var.double(), m.count.double()]) for m in inserted.values() if m.initialized]
    if not parts:
        return 0.0
    high = torch.cat(parts).to(device)
    low = high.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return float((high - low).max())


def _evaluate(engine: Any, loader: Any, batches: int, kind: str, device: torch.device, count: bool = False) -> dict[str, float]:
    engine.module.eval()
    loss_sum = items = correct = b_mse_sum = b_mae_sum = 0.0
    with torch.no_grad():
        for _, batch in zip(range(batches), loader):
            out = compute(engine, batch, kind, device)
            loss_sum += float(out.loss) * out.items
            items += out.items
            correct += out.correct or 0.0
            if count and kind == "nowcast":  # the paper's B-MSE / B-MAE (summed over frames, per sequence)
                batch_mse, batch_mae = _balanced_sums(engine, batch, device)
                b_mse_sum, b_mae_sum = b_mse_sum + batch_mse, b_mae_sum + batch_mae
    engine.module.train()
    loss_sum, items, correct, b_mse_sum, b_mae_sum = _reduce_sum([loss_sum, items, correct, b_mse_sum, b_mae_sum], device)
    metrics = {"eval/loss": loss_sum / max(items, 1)}
    if count:
        metrics["eval/items"] = items
        if kind == "nowcast":
            metrics |= {"eval/b_mse": b_mse_sum / max(items, 1), "eval/b_mae": b_mae_sum / max(items, 1)}
    if kind == "text_lm":
        metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 50.0))
    elif kind != "nowcast":
        metrics["eval/accuracy"] = correct / max(items, 1)
    return metrics


def _balanced_sums(engine: Any, batch: Any, device: torch.device) -> tuple[float, float]:
    """B-MSE and B-MAE of one nowcast batch, summed over its sequences."""
    from memel.models.nowcasting_metrics import b_mae, b_mse

    inputs, targets = batch.inputs.to(device), batch.targets.to(device).float()
    prediction = engine(inputs, targets.shape[1]).float()
    size = targets.shape[0]
    return float(b_mse(prediction, targets)) * size, float(b_mae(prediction, targets)) * size


def _final_evaluation(
    spec: TrainSpec, engine: Any, kind: str, device: torch.device, rank: int, world: int, prefix: str
) -> dict[str, float]:
    """``eval.final`` batches of the held-out set from its start (``all``: every sample once,
    split across ranks), metrics named ``<prefix>loss`` etc., plus ``<prefix>items``; without
    ``eval.final``, ``eval.batches`` batches from the start."""
    final = spec.eval.final if spec.eval.final is not None else spec.eval.batches
    # seed 0: the same held-out set for every run (generated data, e.g. radar echoes, depends on the seed)
    data = {**spec.data, "batch_size": spec.train.micro_batch_size, "seed": 0, "split": "heldout",
            "shuffle": False, "epochs": 1, "drop_last": False, "even_shards": False}  # fmt: skip
    loader = build_loader(data, rank, world)
    batches = len(loader) if final == "all" else int(final)
    evaluation = _evaluate(engine, loader, batches, kind, device, count=True)
    return {f"{prefix}{name.split('/', 1)[1]}": value for name, value in evaluation.items()}


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


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: one data-parallel rank of the run."""
    import deepspeed  # imported here: a top-level import breaks on CPU-only controllers
    import ray.train

    from .worker_env import load_worker_env

    load_worker_env()  # the driver's secrets, before anything connects to MLflow or S3
    _quiet_per_report_logs()

    spec = TrainSpec(**config["spec"])
    info = RunInfo(**config["info"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(spec.train.threads_per_worker)
    if spec.train.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

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
    heldout = build_loader({**data, "split": "heldout", "shuffle": False}, rank, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    scheduler = None
    if spec.train.warmup_steps:
        warmup = spec.train.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    deepspeed.init_distributed(dist_backend="nccl" if spec.train.use_gpu else "gloo")
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(spec)
    )
    checkpoints = _Checkpointing(engine, inserted, loader, rank)
    step = tokens_seen = 0
    # the newest complete checkpoint on disk, even where Ray's record of them lags behind
    restored = newest_checkpoint(config.get("checkpoints"), world, ray.train.get_checkpoint())
    if restored is not None:
        with restored.as_directory() as directory:
            progress = checkpoints.restore(Path(directory))
        step, tokens_seen = progress["step"], progress["tokens_seen"]
        if rank == 0:
            print(f"[memel] resumed from step {step}", flush=True)

    tracker = sink = None
    if rank == 0:
        tracker, sink = _rank0_outputs(spec, info)
    try:
        _train_steps(spec, info, engine, loader, heldout, inserted, depths, checkpoints, tracker, sink, kind, device, step, tokens_seen, rank, world)
    finally:
        if sink is not None:
            sink.close(timeout=120)
        if tracker is not None:
            tracker.flush(timeout=60)  # the driver ends the run; this rank only sends what it logged


def _rank0_outputs(spec: TrainSpec, info: RunInfo) -> tuple[Any, Any]:
    tracker = sink = None
    if info.run_id is not None and info.tracking_uri is not None:
        from memel.tracking import MlflowTracker

        tracker = MlflowTracker(info.tracking_uri, spec.tracking.experiment, run_id=info.run_id)
        tracker.start()
    if spec.stats.enabled and info.stats_root is not None and info.run_id is not None:
        from memel.stats import ParquetStatsSink

        sink = ParquetStatsSink(info.stats_root, info.run_id)
    return tracker, sink


def _train_steps(
    spec: TrainSpec, info: RunInfo, engine: Any, loader: Any, heldout: Any, inserted: dict[str, memel.Inhibitor],
    depths: dict[str, float], checkpoints: _Checkpointing, tracker: Any, sink: Any, kind: str,
    device: torch.device, step: int, tokens_seen: int, rank: int, world: int,
) -> None:  # fmt: skip
    import ray.train

    train = spec.train
    window_loss = window_items = 0.0
    window_start, window_steps = time.perf_counter(), 0
    metrics: dict[str, float] = {}
    initial: dict[str, float] = {}
    if spec.model.init_from is not None and step == 0:  # the pretrained model's score, before fine-tuning
        initial = _final_evaluation(spec, engine, kind, device, rank, world, prefix="init/")
        if rank == 0 and tracker is not None:
            tracker.log_metrics(initial, 0)
    while step < train.steps:
        for _ in range(train.accumulation):
            batch = next(loader)
            out = compute(engine, batch, kind, device)
            # mode l2e: the inhibition is a loss term over this forward's selected values (zero otherwise)
            engine.backward(out.loss + memel.auxiliary_loss(engine.module))
            engine.step()
            window_loss += float(out.loss.detach()) * out.items
            window_items += out.items
            tokens_seen += out.items * world
        memel.sync(engine.module)
        step += 1
        window_steps += 1
        _maybe_inject_fault(step, rank, world)

        if step % train.log_every == 0 or step == train.steps:
            loss_sum, items = _reduce_sum([window_loss, window_items], device)
            elapsed = time.perf_counter() - window_start
            metrics = {
                "train/loss": loss_sum / max(items, 1),
                "train/items_per_s": items / max(elapsed, 1e-9),
                "train/step_time_s": elapsed / max(window_steps, 1),
                "train/tokens_seen": float(tokens_seen),
                "train/lr": float(engine.get_lr()[0]) if engine.get_lr() else spec.train.lr,
            }
            if kind == "text_lm":
                metrics["train/tokens_per_s"] = metrics["train/items_per_s"]
            if rank == 0:
                remaining = (train.steps - step) * metrics["train/step_time_s"]
                print(
                    f"[memel] step {step}/{train.steps} loss {metrics['train/loss']:.4f} "
                    f"{metrics['train/items_per_s']:,.0f} {'tokens' if kind == 'text_lm' else 'items'}/s "
                    f"eta {remaining:,.0f}s",
                    flush=True,
                )
                if tracker is not None:
                    tracker.log_metrics(metrics, step)
            window_loss = window_items = 0.0
            window_start, window_steps = time.perf_counter(), 0

        pruned = False
        if step % spec.eval.every == 0 or step == train.steps:
            evaluation = _evaluate(engine, heldout, spec.eval.batches, kind, device)
            metrics.update(evaluation)
            if rank == 0 and tracker is not None:
                tracker.log_metrics(evaluation, step)
            if info.trial is not None:
                pruned = _report_to_trial(info.trial, evaluation, step, rank, device)

        if step == train.steps and spec.eval.final is not None:
            final = _final_evaluation(spec, engine, kind, device, rank, world, prefix="heldout/")
            metrics.update(final)
            if rank == 0 and tracker is not None:
                tracker.log_metrics(final, step)

        if inserted and (step % spec.stats.every == 0 or step == train.steps):
            snaps = memel.snapshot(engine.module)  # a collective: every rank calls it
            divergence = rank_divergence(inserted, device)
            metrics["stats/rank_divergence"] = divergence
            metrics.update(_snapshot_summary(snaps))
            if rank == 0:
                _publish_snapshots(spec, info, snaps, depths, step, tokens_seen, tracker, sink)
                if tracker is not None:
                    tracker.log_metrics({"stats/rank_divergence": divergence}, step)

        if step % spec.checkpoint.every == 0 or step == train.steps:
            for output in (sink, tracker):  # what a checkpoint covers is stored first: a resume never misses it
                if output is not None and not output.flush(timeout=60):
                    print(f"[memel] warning: step {step} checkpointed before all its outputs were stored", flush=True)
            with tempfile.TemporaryDirectory(prefix="memel-ckpt-") as directory:
                checkpoints.save(Path(directory), step, tokens_seen, info.run_id)
                report = {**initial, **metrics, "step": step, "tokens_seen": tokens_seen}
                if rank == 0:  # what a rerun reports when this checkpoint turns out to be the last one
                    (Path(directory) / MEMEL_STATE / "report.json").write_text(json.dumps(report))
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory))
        if pruned:  # every rank got the same decision; the driver tells the study
            if rank == 0:
                print(f"[memel] pruned by the study at step {step}", flush=True)
            ray.train.report({**metrics, "step": step, "tokens_seen": tokens_seen, "pruned": 1.0})
            return


def _report_to_trial(trial: dict[str, Any], evaluation: dict[str, float], step: int, rank: int, device: torch.device) -> bool:
    """Rank 0 reports the trial's metric to Optuna and asks the pruner; every rank gets the answer."""
    decision = 0.0
    if rank == 0 and trial["metric"] in evaluation:
        from memel.orchestration.optuna_storage import open_trial

        optuna_trial = open_trial(trial["storage"], trial["study"], trial["trial_id"], trial.get("pruner", "median"))
        optuna_trial.report(evaluation[trial["metric"]], step)
        decision = 1.0 if optuna_trial.should_prune() else 0.0
    return _reduce_sum([decision], device)[0] > 0


def _snapshot_summary(snaps: dict[str, memel.Snapshot]) -> dict[str, float]:
    """Run-level MS summaries over every inserted module (what a sweep's table shows)."""
    if not snaps:
        return {}
    values = list(snaps.values())
    return {
        "ms/mean": float(sum(float(s.mean_ms.mean()) for s in values) / len(values)),
        "ms/max": max(float(s.max_ms.max()) for s in values),
        "ms/frac_above": float(sum(float(s.frac_above.mean()) for s in values) / len(values)),
        "inhibited/total": float(sum(float(s.inhibited_count.sum()) for s in values)),
    }


def _publish_snapshots(
    spec: TrainSpec, info: RunInfo, snaps: dict[str, memel.Snapshot], depths: dict[str, float], step: int,
    tokens_seen: int, tracker: Any, sink: Any,
) -> None:  # fmt: skip
    inhibition = spec.inhibition
    assert inhibition is not None
    module_metrics: dict[str, float] = {}
    for name, snap in snaps.items():
        module_metrics[f"ms/{name}/mean"] = float(snap.mean_ms.mean())
        module_metrics[f"ms/{name}/max"] = float(snap.max_ms.max())
        module_metrics[f"ms/{name}/frac_above"] = float(snap.frac_above.mean())
        module_metrics[f"inhibited/{name}"] = float(snap.inhibited_count.sum())
        if sink is not None:
            from memel.stats import snapshot_table

            table = snapshot_table(
                snap, run_id=info.run_id, model=spec.model.name, n_params=info.n_params, mode=inhibition.mode,
                strength=inhibition.strength, top_n=inhibition.top_n, seed=spec.train.seed, step=step,
                tokens_seen=tokens_seen, module=name, depth=depths[name], layout=inhibition.layout,
                preset=spec.inserted_preset, select=inhibition.select,
            )  # fmt: skip
            sink.submit(table, module=name, step=step)
    if tracker is not None:
        tracker.log_metrics(module_metrics, step)
