"""The driver side of a training run: preflight, MLflow run, Ray Train, summary.

Credentials never travel in files or output: every URI is stored and shown redacted
(``memel.redaction``), and secrets reach the workers through a private file, never through
anything Ray logs (``worker_env``).

With no address a local Ray instance starts in-process, bound to 127.0.0.1 (the embedded default); with
``address`` (or RAY_ADDRESS) the same run goes to a cluster. The MLflow run id is created
once and stored in the output dir, and Ray Train's run name is derived from the spec, so
running the same spec again resumes it (from its last checkpoint) instead of starting over; an
output folder that holds a run of another spec is refused (``output_dir``).

A run whose loss becomes non-finite fails at once: the workers return the divergence (Ray Train
would restart workers that raise it, ``checkpoint.max_failures``) and the driver raises it. A
failed run's statistics that never reached the statistics root are named in a warning.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memel import run_record
from memel.atomic import write_json
from memel.errors import ConfigError
from memel.redaction import redact, redact_tree

from .deepspeed_config import deepspeed_config
from .interrupt import describe, end_after_error, interruptible
from .lost_statistics import warn_unwritten
from .output_dir import Claim, check_output_dir, run_claim
from .run_lock import hold_lock
from .spec import TrainSpec

if TYPE_CHECKING:
    from .checkpoint_scan import FoundCheckpoint, RunFolder
    from .trial import TrialConfig
    from .worker import RunInfo

#: The embedded Ray's processes (GCS, raylet, dashboard, agents, workers) listen only here.
LOOPBACK = "127.0.0.1"

#: The embedded Ray's settings: its workers run at the training's own priority. Ray's default
#: niceness of 15 gives every other process on the machine (Ray's own GCS, raylet, dashboard
#: and agents, the driver, anything else running) precedence over the training workers.
EMBEDDED_SYSTEM_CONFIG = {"worker_niceness": 0}


@dataclass
class TrainResult:
    """Where a finished run's results are."""

    run_name: str
    run_id: str | None
    tracking_uri: str | None
    stats_root: str | None
    checkpoint: str | None
    output_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0


def resolve_outputs(spec: TrainSpec, claim: Claim | None = None) -> tuple[Path, str | None, str | None, str]:
    """Output dir, tracking URI, stats root and checkpoint storage, each checked before any worker
    starts; ``claim``: what the output dir must hold if memel wrote there (see ``output_dir``)."""
    from memel.stats import check_stats_root
    from memel.tracking import check_tracking_uri, default_tracking_uri

    out = spec.out.resolve()
    check_output_dir(out, claim=claim)
    created = next((folder for folder in [*reversed(out.parents), out] if not folder.exists()), None)
    out.mkdir(parents=True, exist_ok=True)
    try:
        tracking_uri = spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(out)
        check_tracking_uri(tracking_uri)
        stats_root = None
        if spec.stats.enabled and spec.inhibition is not None:
            stats_root = spec.stats.root or str(out / "stats")
            check_stats_root(stats_root)
    except ConfigError:
        if created is not None:  # a refused run leaves nothing behind: remove the folders made for it
            shutil.rmtree(created, ignore_errors=True)
        raise
    storage = spec.checkpoint.storage or str(out / "checkpoints")
    return out, tracking_uri, stats_root, storage


def _start_tracking(spec: TrainSpec, out: Path, tracking_uri: str, n_params: int) -> tuple[Any, str]:
    from memel.tracking import flatten, start_recorded_run

    tracker, new = start_recorded_run(
        out / run_record.RUN_FILE,
        "run_id",
        lambda run_id: {"run_name": spec.run_name, "run_id": run_id, "tracking_uri": redact(tracking_uri)},
        tracking_uri,
        spec.tracking.experiment,
        spec.tracking.run_name or spec.run_name,
        resumable=lambda previous: previous.get("run_name") == spec.run_name,
        parent_run_id=spec.tracking.parent_run_id,
    )
    run_id = tracker.run_id
    public_spec = redact_tree(spec.model_dump(mode="json"))
    write_json(out / run_record.SPEC_FILE, public_spec)  # what offline analysis rebuilds the model from
    if new:
        tracker.log_params(flatten(public_spec))
        inhibition = spec.inhibition
        tracker.set_tags(
            {
                run_record.TAG_MODEL: spec.model.name,
                run_record.TAG_RUNG: spec.model.name,
                run_record.TAG_N_PARAMS: str(n_params),
                run_record.TAG_MODE: inhibition.mode if inhibition else "none",
                run_record.TAG_STRENGTH: str(inhibition.strength) if inhibition else "",
                run_record.TAG_TOP_N: str(inhibition.top_n) if inhibition else "",
                run_record.TAG_SEED: str(spec.train.seed),
                run_record.TAG_SELECT: inhibition.select if inhibition else "",
                run_record.TAG_LAYOUT: inhibition.layout if inhibition else "",
                run_record.TAG_PRESET: spec.inserted_preset,
                run_record.TAG_GIT_COMMIT: _git_commit(),
                run_record.TAG_RUN_NAME: spec.run_name,
                **spec.tracking.tags,
            }
        )
        tracker.log_dict(public_spec, run_record.SPEC_FILE)
        tracker.log_dict(deepspeed_config(spec), run_record.DEEPSPEED_CONFIG_FILE)
    return tracker, run_id


def _git_commit() -> str:
    import subprocess

    try:
        here = Path(__file__).resolve().parent
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"], check=False, cwd=here, capture_output=True, text=True, timeout=5
        )
        return found.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def init_ray(address: str | None, workers: int) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start the embedded local instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        start_embedded_ray(max(os.cpu_count() or 1, workers))


def start_embedded_ray(num_cpus: int) -> None:
    """A local Ray instance in this process whose every process listens on 127.0.0.1 only.

    Ray turns a loopback node address into the host's address unless its cluster mode is off
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read once on import, so set here for the start);
    with the node on 127.0.0.1 the GCS, raylet, workers, dashboard, agents and metrics endpoint
    all bind to it. The dashboard serves the state API Ray Train's placement-group cleaner polls.
    The workers run at niceness 0, as a process started from the shell would
    (:data:`EMBEDDED_SYSTEM_CONFIG`). Its token (Ray turns token authentication on for a local
    instance) is readable by this user only (:mod:`memel.training.ray_token`).
    """
    import ray
    from ray._private import ray_constants

    from .ray_token import ensure_private_token

    ensure_private_token()  # Ray would write the token it generates readable by every user
    saved_flag, saved_env = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"  # for the processes started now
    try:
        ray.init(  # address "local": a new instance, never a cluster `ray start` left on this machine
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host=LOOPBACK,
            _node_ip_address=LOOPBACK,
            _system_config=EMBEDDED_SYSTEM_CONFIG,
            log_to_driver=True,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = saved_env


def run_training(spec: TrainSpec, address: str | None = None, trial: TrialConfig | None = None) -> TrainResult:
    """Run (or resume) one training run; blocks until it ends and returns where its results are.

    ``trial`` (storage, study, trial number, metric, pruner) makes the run an Optuna trial: evaluations are
    reported to it and the run stops early when the study prunes it (MLflow status KILLED).
    """
    started = time.perf_counter()
    claim = run_claim(spec.run_name)  # a folder that holds a run of another spec is refused
    check_output_dir(spec.out.resolve(), claim=claim)
    with hold_lock(spec.out.resolve()):  # one invocation at a time; taken before anything is written
        out, tracking_uri, stats_root, storage = resolve_outputs(spec, claim)
        return _run_locked(spec, address, trial, started, out, tracking_uri, stats_root, storage)


def _run_locked(
    spec: TrainSpec,
    address: str | None,
    trial: dict[str, Any] | None,
    started: float,
    out: Path,
    tracking_uri: str,
    stats_root: str | None,
    storage: str,
) -> TrainResult:
    from memel.models import count_parameters

    from .worker import RunInfo
    from .worker_env import worker_env

    n_params = count_parameters(spec.model.name, **spec.model.overrides)
    tracker, run_id = _start_tracking(spec, out, tracking_uri, n_params)
    init_ray(address, spec.train.workers)
    with worker_env(tracking_uri) as (env, worker_tracking_uri):
        info = RunInfo(
            run_id=run_id, tracking_uri=worker_tracking_uri, stats_root=stats_root, n_params=n_params, trial=trial
        )
        result = _fit(spec, info, storage, env, tracker)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))}
    outcome = TrainResult(
        run_name=spec.run_name,
        run_id=run_id,
        tracking_uri=redact(tracking_uri),
        stats_root=stats_root,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        output_dir=str(out),
        metrics=metrics,
        wall_seconds=time.perf_counter() - started,
    )
    write_json(out / run_record.SUMMARY_FILE, asdict(outcome))
    tracker.log_dict(asdict(outcome), run_record.SUMMARY_FILE)
    if metrics.get("pruned"):
        tracker.set_tags({run_record.TAG_PRUNED: "true"})
    tracker.end("KILLED" if metrics.get("pruned") else "FINISHED")
    return outcome


def _fit(spec: TrainSpec, info: RunInfo, storage: str, env: dict[str, str], tracker: Any) -> Any:
    """Ray Train's run of the workers; the MLflow run ends FAILED when it (or reading the checkpoint
    storage before it) raises."""
    try:
        return _resume_and_train(spec, info, storage, env)
    except BaseException as error:
        marked = end_after_error(tracker, error)
        if marked and not isinstance(error, KeyboardInterrupt):  # the store answers: compare it with the stats
            warn_unwritten(info.stats_root, info.run_id, getattr(tracker, "client", None), describe(error))
        raise


def _resume_and_train(spec: TrainSpec, info: RunInfo, storage: str, env: dict[str, str]) -> Any:
    """The run's result on disk when its last checkpoint is complete, else Ray Train's run from its
    newest complete checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .checkpoint_scan import finished_on_disk, run_folder
    from .worker import raise_if_diverged, train_loop

    run = run_folder(storage, spec.run_name)
    untracked: list[str] = []
    if run is not None:
        found, untracked = _report_resume_point(run, spec.train.workers, spec.checkpoint.keep)
        done = finished_on_disk(found, spec.train.steps)
        if done is not None:  # stopped after its last checkpoint, before Ray recorded it
            return done
    trainer = interruptible(TorchTrainer)(
        train_loop,
        train_loop_config={
            "spec": redact_tree(spec.model_dump(mode="json")),
            "info": asdict(info),
            "checkpoint_storage": storage if run is not None else None,
            "run_name": spec.run_name,
            "unrecorded": untracked,  # checkpoints Ray does not track: rank 0 prunes them beyond keep
        },
        scaling_config=ScalingConfig(
            num_workers=spec.train.workers,
            use_gpu=spec.train.use_gpu,
            resources_per_worker={"GPU": 1, "CPU": 1} if spec.train.use_gpu else {"CPU": 1},
            placement_strategy=spec.train.placement,
        ),
        torch_config=TorchConfig(backend="nccl" if spec.train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=spec.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=spec.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )
    result = trainer.fit()
    raise_if_diverged(getattr(result, "return_value", None))  # rank 0 said the loss became non-finite
    return result


def _report_resume_point(run: RunFolder, workers: int, keep: int) -> tuple[FoundCheckpoint | None, list[str]]:
    """Say where the run resumes, set aside Ray's record of its checkpoints when it is unreadable or
    behind, and prune the checkpoints Ray does not track beyond ``keep``; returns the resume point
    and the untracked checkpoints left (pyarrow loads here, not when ``memel validate`` imports this module)."""
    from .checkpoint_pruning import prune, unrecorded
    from .checkpoint_scan import repair_snapshot, scan_run

    scan = scan_run(run, workers)
    for name, reason in scan.skipped.items():
        print(f"[memel] warning: checkpoint {name} is incomplete ({reason}); skipped", flush=True)
    repaired = repair_snapshot(run, scan.newest)
    if repaired:
        print(f"[memel] warning: {repaired}", flush=True)
    untracked = unrecorded(run, scan)
    deleted = prune(run, scan, keep, untracked)
    for name in deleted:
        print(f"[memel] deleted checkpoint {name} (checkpoint.keep={keep})", flush=True)
    if scan.newest is not None:
        print(f"[memel] resuming from the checkpoint of step {scan.newest.step} ({scan.newest.name})", flush=True)
    return scan.newest, [name for name in untracked if name not in deleted]


def check_address_outputs(spec: TrainSpec, address: str | None) -> None:
    """On a cluster, local paths for tracking or statistics would land on the workers' disks."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        return
    tracking = spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    checks = [("tracking.uri", tracking)]
    if spec.stats.enabled and spec.inhibition is not None:
        checks.append(("stats.root", spec.stats.root))
    for field_name, value in checks:
        if value is None or value.startswith(("file:", "sqlite:", "/", ".")):
            raise ConfigError(
                f"{field_name}: {redact(value) if value else value!r} is local to this machine, but the run goes to a cluster; "
                "use an http(s):// MLflow server (tracking.uri or MLFLOW_TRACKING_URI) and an s3:// statistics root "
                "(stats.root, or stats.enabled: false)"
            )
