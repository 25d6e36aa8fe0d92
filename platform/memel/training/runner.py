"""The driver side of a training run: preflight, MLflow run, Ray Train, summary.

Credentials never travel in files or output: a tracking URI is shown and stored without any
``user:password@`` part (give MLflow credentials as MLFLOW_TRACKING_USERNAME/PASSWORD or
MLFLOW_TRACKING_TOKEN, which are forwarded to the workers' environment).

With no address a local Ray instance starts in-process (the embedded default); with
``address`` (or RAY_ADDRESS) the same run goes to a cluster. The MLflow run id is created
once and stored in the output dir, and Ray Train's run name is derived from the spec, so
running the same spec again resumes it (from its last checkpoint) instead of starting over.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memel.atomic import write_json
from memel.errors import ConfigError
from memel.models import count_parameters

from .deepspeed_config import deepspeed_config
from .spec import TrainSpec
from .worker import FAULT_MARKER_ENV, FAULT_STEP_ENV, RunInfo, train_loop

#: Environment variables forwarded to the workers (values never logged).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
    "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD", FAULT_STEP_ENV, FAULT_MARKER_ENV,
)  # fmt: skip


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


def resolve_outputs(spec: TrainSpec) -> tuple[Path, str | None, str | None, str]:
    """Output dir, tracking URI, stats root and checkpoint storage, each checked before any worker starts."""
    from memel.stats import check_stats_root
    from memel.tracking import check_tracking_uri, default_tracking_uri

    out = spec.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(out)
    check_tracking_uri(tracking_uri)
    stats_root = None
    if spec.stats.enabled and spec.inhibition is not None:
        stats_root = spec.stats.root or str(out / "stats")
        check_stats_root(stats_root)
    storage = spec.checkpoint.storage or str(out / "checkpoints")
    return out, tracking_uri, stats_root, storage


def _start_tracking(spec: TrainSpec, out: Path, tracking_uri: str, n_params: int) -> tuple[Any, str]:
    from memel.tracking import MlflowTracker, flatten, public_uri

    state_file = out / "run.json"
    previous = json.loads(state_file.read_text()) if state_file.exists() else {}
    run_id = previous.get("run_id") if previous.get("run_name") == spec.run_name else None
    tracker = MlflowTracker(
        tracking_uri, spec.tracking.experiment, run_id=run_id,
        run_name=spec.tracking.run_name or spec.run_name, parent_run_id=spec.tracking.parent_run_id,
    )  # fmt: skip
    run_id = tracker.start()
    write_json(state_file, {"run_name": spec.run_name, "run_id": run_id, "tracking_uri": public_uri(tracking_uri)})
    write_json(out / "spec.json", spec.model_dump(mode="json"))  # what offline analysis rebuilds the model from
    if previous.get("run_id") != run_id:
        tracker.log_params(flatten(spec.model_dump(mode="json")))
        inhibition = spec.inhibition
        tracker.set_tags({
            "memel.model": spec.model.name, "memel.rung": spec.model.name, "memel.n_params": str(n_params),
            "memel.mode": inhibition.mode if inhibition else "none",
            "memel.strength": str(inhibition.strength) if inhibition else "",
            "memel.top_n": str(inhibition.top_n) if inhibition else "", "memel.seed": str(spec.train.seed),
            "memel.select": inhibition.select if inhibition else "",
            "memel.layout": inhibition.layout if inhibition else "", "memel.preset": spec.inserted_preset,
            "memel.git_commit": _git_commit(), "memel.run_name": spec.run_name, **spec.tracking.tags,
        })  # fmt: skip
        tracker.log_dict(spec.model_dump(mode="json"), "spec.json")
        tracker.log_dict(deepspeed_config(spec), "deepspeed_config.json")
    return tracker, run_id


def _git_commit() -> str:
    import subprocess

    try:
        here = Path(__file__).resolve().parent
        found = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=here, capture_output=True, text=True, timeout=5)
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
    else:  # the embedded default: a local instance in this process, enough CPU slots for every worker;
        # its dashboard (on 127.0.0.1) serves the state API that Ray Train's placement-group cleaner polls
        ray.init(
            num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=True, dashboard_host="127.0.0.1",
            log_to_driver=True,
        )  # fmt: skip


def run_training(spec: TrainSpec, address: str | None = None, trial: dict[str, Any] | None = None) -> TrainResult:
    """Run (or resume) one training run; blocks until it ends and returns where its results are.

    ``trial`` (storage, study, trial_id, metric) makes the run an Optuna trial: evaluations are
    reported to it and the run stops early when the study prunes it (MLflow status KILLED).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from memel.tracking import public_uri

    started = time.perf_counter()
    out, tracking_uri, stats_root, storage = resolve_outputs(spec)
    n_params = count_parameters(spec.model.name, **spec.model.overrides)
    tracker, run_id = _start_tracking(spec, out, tracking_uri, n_params)
    info = RunInfo(run_id=run_id, tracking_uri=tracking_uri, stats_root=stats_root, n_params=n_params, trial=trial)
    init_ray(address, spec.train.workers)
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.model_dump(mode="json"), "info": asdict(info)},
        scaling_config=ScalingConfig(
            num_workers=spec.train.workers, use_gpu=spec.train.use_gpu,
            resources_per_worker={"GPU": 1, "CPU": 1} if spec.train.use_gpu else {"CPU": 1},
        ),  # fmt: skip
        torch_config=TorchConfig(backend="nccl" if spec.train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=spec.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=spec.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )
    try:
        result = trainer.fit()
    except BaseException:
        tracker.end("FAILED")
        raise
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))}
    outcome = TrainResult(
        run_name=spec.run_name, run_id=run_id, tracking_uri=public_uri(tracking_uri), stats_root=stats_root,
        checkpoint=result.checkpoint.path if result.checkpoint else None, output_dir=str(out), metrics=metrics,
        wall_seconds=time.perf_counter() - started,
    )  # fmt: skip
    write_json(out / "summary.json", asdict(outcome))
    tracker.log_dict(asdict(outcome), "summary.json")
    if metrics.get("pruned"):
        tracker.set_tags({"memel.pruned": "true"})
    tracker.end("KILLED" if metrics.get("pruned") else "FINISHED")
    return outcome


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
                f"{field_name}: {value!r} is local to this machine, but the run goes to a cluster; "
                "use an http(s):// MLflow server (tracking.uri or MLFLOW_TRACKING_URI) and an s3:// statistics root "
                "(stats.root, or stats.enabled: false)"
            )
