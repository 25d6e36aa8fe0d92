"""MEmeL-Tune as an Optuna study: every trial is a training run on Ray and an MLflow child run.

The driver asks the study for parameters, launches up to ``tune.parallel`` trials at once,
and tells the study each result (the final value of ``tune.metric``). Rank 0 of every trial
reports each evaluation to the study, so the pruner can stop it early. ``tune.trials`` counts
the whole study: starting the job again continues it (trials that an interrupted invocation
left running are run again with the same parameters, resuming their training).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memel import run_record
from memel.atomic import write_text
from memel.errors import ConfigError
from memel.redaction import redact
from memel.training import init_ray
from memel.training.output_dir import Claim, check_output_dir
from memel.training.run_lock import hold_lock
from memel.training.runner import resolve_outputs
from memel.training.trial import TrialConfig

from .job import JobSpec, TuneSection, attach, member_spec
from .launch import Finished, Launcher, noting_interrupts
from .optuna_storage import dashboard_command, default_storage, make_pruner, open_storage

INTERRUPTED = run_record.ATTR_INTERRUPTED


@dataclass
class StudyResult:
    """A study after this invocation: its trials, the best one, and where everything is."""

    study_name: str
    storage: str
    parent_run_id: str
    tracking_uri: str
    output_dir: str
    dashboard: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    wall_seconds: float = 0.0


def make_sampler(tune: TuneSection, offset: int = 0) -> Any:
    """The study's sampler, seeded from ``tune.seed`` plus the trials the study already holds (a
    continued study must not replay the first invocation's random draws)."""
    import optuna

    class AskTellGridSampler(optuna.samplers.GridSampler):
        """The grid sampler without its end-of-grid ``study.stop()``, which only works inside
        ``optimize()``; the driver counts trials itself."""

        def after_trial(self, *_: object) -> None:
            return None

    if tune.sampler == "grid":
        return AskTellGridSampler(tune.grid_space(), seed=tune.seed + offset)
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=tune.seed + offset)
    return optuna.samplers.TPESampler(seed=tune.seed + offset)


def suggest(trial: Any, job: JobSpec, tune: TuneSection) -> dict[str, Any]:
    """The trial's parameters, as dotted overrides of the job's base spec."""
    if tune.sampler == "grid":
        grid = tune.grid_space()
        return {
            "inhibition.mode": "rd",
            "inhibition.top_n": int(trial.suggest_categorical("top_n", grid["top_n"])),
            "inhibition.strength": float(trial.suggest_categorical("strength", grid["strength"])),
        }
    space = tune.space
    base = job.inhibition
    assert base is not None
    overrides: dict[str, Any] = {}
    mode = trial.suggest_categorical("mode", space.mode) if space.mode else base.mode
    overrides["inhibition.mode"] = mode
    if mode == "rd" and space.strength is not None:
        overrides["inhibition.strength"] = trial.suggest_float(
            "strength", space.strength.low, space.strength.high, log=space.strength.log
        )
    elif mode != "rd":
        overrides["inhibition.strength"] = 1.0
    if space.top_n:
        overrides["inhibition.top_n"] = trial.suggest_categorical("top_n", space.top_n)
    if space.preset:
        overrides["model.preset"] = trial.suggest_categorical("preset", space.preset)
    if space.forget_steps is not None:
        overrides["inhibition.forget_steps"] = trial.suggest_int(
            "forget_steps", space.forget_steps.low, space.forget_steps.high
        )
    if space.late_start is not None:
        overrides["inhibition.late_start"] = trial.suggest_int(
            "late_start", space.late_start.low, space.late_start.high
        )
    return overrides


def trial_key(overrides: dict[str, Any]) -> str:
    """Named by its parameters: the same parameters (a re-run trial) resume the same training run."""
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"trial-{digest}"


def check_study(job: JobSpec, address: str | None) -> TuneSection:
    """What ``memel tune`` needs beyond the schema: a tune section, inhibition, storage reachable from workers."""
    if job.tune is None:
        raise ConfigError("tune: the job has no tune section; add `tune: {trials: 20}` (see jobs/tune_memel.yaml)")
    if job.inhibition is None:
        raise ConfigError(
            "inhibition: a study tunes inhibition; the job has `inhibition: null`, give it an inhibition section"
        )
    on_cluster = bool(address or os.environ.get("RAY_ADDRESS"))
    storage = job.tune.storage or ""
    if on_cluster and not storage.startswith(("postgresql", "mysql")):
        raise ConfigError(
            f"tune.storage: {redact(storage) if storage else 'the default local file'} is on this machine, but trials "
            "run on a cluster and report to the study from their workers; use postgresql://... or mysql://..."
        )
    return job.tune


def _parent_run(job: JobSpec, tune: TuneSection, out: Path, tracking_uri: str, study_name: str, storage: str) -> Any:
    from memel.tracking import flatten, start_recorded_run

    tracker, new = start_recorded_run(
        out / run_record.STUDY_FILE,
        "parent_run_id",
        lambda run_id: {
            "study": study_name,
            "fingerprint": study_fingerprint(job, tune),
            "parent_run_id": run_id,
            "storage": redact(storage),
            "tracking_uri": redact(tracking_uri),
        },
        tracking_uri,
        job.tracking.experiment,
        study_name,
    )
    if new:
        tracker.log_params(flatten({"tune": tune.model_dump(mode="json")}))
        tracker.set_tags(
            {
                run_record.TAG_KIND: run_record.KIND_STUDY,
                run_record.TAG_STUDY: study_name,
                run_record.TAG_OPTUNA_STORAGE: redact(storage),
                run_record.TAG_RUNG: job.model.name,
                **job.tracking.tags,
            }
        )
        tracker.log_dict(job.model_dump(mode="json"), run_record.JOB_FILE)
    return tracker


def _finished_count(study: Any) -> int:
    from optuna.trial import TrialState

    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state in ended and not t.user_attrs.get(INTERRUPTED))


def _requeue(study: Any, trials: list[Any]) -> None:
    """Fail interrupted trials (marked, so they do not count) and enqueue their parameters again:
    the next invocation reruns them, resuming the same training runs (named by parameters)."""
    from optuna.trial import TrialState

    for trial in trials:
        study.enqueue_trial(trial.params, skip_if_exists=False)
        # FrozenTrials have no setter; the storage call is how Optuna itself records user attrs
        study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
        study.tell(trial.number, state=TrialState.FAIL)


def _requeue_interrupted(study: Any) -> int:
    """Trials a previous invocation left RUNNING (it was killed) go back in the queue."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    _requeue(study, stale)
    return len(stale)


def trial_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(INTERRUPTED):
            continue
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "value": t.value,
                **{f"param_{k}": v for k, v in t.params.items()},
                "run_id": t.user_attrs.get(run_record.ATTR_MLFLOW_RUN_ID),
                "member": t.user_attrs.get(run_record.ATTR_MEMBER),
            }
        )
    return rows


def _rows_csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def run_study(
    job: JobSpec,
    address: str | None = None,
    trials: int | None = None,
    parallel: int | None = None,
    progress: Any = None,
) -> StudyResult:
    """Run the job's study until it holds ``trials`` finished trials; blocks until then.

    One invocation at a time per output dir: a second one raises RunLocked (a ConfigError), and a
    folder that holds another study (or a run or sweep) is refused, both before anything is written."""
    started = time.perf_counter()
    tune = check_study(job, address)
    tune = tune.model_copy(update={k: v for k, v in {"trials": trials, "parallel": parallel}.items() if v is not None})
    if tune.storage and tune.storage.startswith("sqlite:") and tune.parallel > 1:
        raise ConfigError(
            f"--parallel {tune.parallel}: the study's storage is SQLite, which is not safe for parallel writers; use a journal or PostgreSQL storage"
        )
    claim = study_claim(job, tune)
    check_output_dir(job.out.resolve(), claim=claim)
    with hold_lock(job.out.resolve()):
        return _run_study(job, address, tune, claim, started, progress)


def study_claim(job: JobSpec, tune: TuneSection) -> Claim:
    """A study's claim on its folder: its name and fingerprint (``study.json``)."""
    return Claim(
        run_record.STUDY_FILE, {"study": tune.study_name or job.name, "fingerprint": study_fingerprint(job, tune)}
    )


def study_fingerprint(job: JobSpec, tune: TuneSection) -> str:
    """What a study's trials share: the base run's fingerprint and the tune section, but not how many
    trials to hold or run at once (``--trials``, ``--parallel``: a study continues with more)."""
    settings = tune.model_dump(mode="json", exclude={"trials", "parallel"})
    text = json.dumps({"base": job.base_fingerprint(), "tune": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _run_study(
    job: JobSpec, address: str | None, tune: TuneSection, claim: Claim, started: float, progress: Any
) -> StudyResult:
    import optuna
    from optuna.trial import TrialState

    notify = progress or (lambda *_: None)
    out, tracking_uri, stats_root, _ = resolve_outputs(job, claim)
    storage_url = tune.storage or default_storage(out, tune.parallel)
    study_name = tune.study_name or job.name
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=open_storage(storage_url),
        sampler=make_sampler(tune),
        pruner=make_pruner(tune.pruner),
        direction=tune.direction,
        load_if_exists=True,
    )
    if held := len(study.get_trials(deepcopy=False)):
        study.sampler = make_sampler(tune, held)
    requeued = _requeue_interrupted(study)
    if requeued:
        notify("requeued", str(requeued), None)
    parent = _parent_run(job, tune, out, tracking_uri, study_name, storage_url)
    target = tune.trials
    if tune.sampler == "grid":
        target = min(target, len(tune.grid_space()["top_n"]) * len(tune.grid_space()["strength"]))
    remaining = target - _finished_count(study)
    launcher: Launcher | None = None
    trials_in_flight: dict[str, Any] = {}

    def tell(outcome: Finished) -> None:
        trial = trials_in_flight.pop(outcome.key)
        result = outcome.result
        if result is not None and result.run_id:
            trial.set_user_attr(run_record.ATTR_MLFLOW_RUN_ID, result.run_id)
        if result is None:
            study.tell(trial, state=TrialState.FAIL)
            notify("failed", outcome.key, outcome.error)
        elif result.metrics.get("pruned"):
            study.tell(trial, state=TrialState.PRUNED)
            notify("pruned", outcome.key, result)
        elif tune.metric not in result.metrics:
            study.tell(trial, state=TrialState.FAIL)
            notify("failed", outcome.key, f"the run reported no {tune.metric!r}; it reported {sorted(result.metrics)}")
        else:
            value = float(result.metrics[tune.metric])
            study.tell(trial, value)
            parent.log_metrics({f"trial/{tune.metric}": value}, trial.number)
            notify("finished", outcome.key, result)

    if remaining > 0:
        init_ray(address, job.train.workers)
        launcher = Launcher(tune.parallel)
    try:
        with noting_interrupts():
            while launcher is not None and (remaining > 0 or launcher.in_flight):
                if remaining > 0 and launcher.has_room(job):  # every trial needs what the base run needs
                    trial = study.ask()
                    overrides = suggest(trial, job, tune)
                    key = trial_key(overrides)
                    tags = {
                        run_record.TAG_STUDY: study_name,
                        run_record.TAG_TRIAL: str(trial.number),
                        run_record.TAG_KIND: run_record.KIND_TRIAL,
                    }
                    spec = attach(
                        member_spec(job, key, overrides, f"trial {trial.number}", folder=run_record.TRIALS_DIR),
                        tracking_uri,
                        parent.run_id,
                        stats_root,
                        tags,
                    )
                    trial.set_user_attr(run_record.ATTR_MEMBER, key)
                    name = str(trial.number)
                    trials_in_flight[name] = trial
                    launcher.launch(
                        name, spec, TrialConfig(storage_url, study_name, trial.number, tune.metric, tune.pruner)
                    )
                    notify("started", name, trial.params)
                    remaining -= 1
                else:
                    tell(launcher.wait_one())
    except BaseException:
        if launcher is not None:
            launcher.stop_all()
        _requeue(study, list(trials_in_flight.values()))
        parent.end("KILLED")
        raise
    rows = trial_rows(study)
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    best = None
    if completed:
        best_trial = study.best_trial
        best = {"trial": best_trial.number, "value": best_trial.value, "params": best_trial.params}
        parent.log_metrics({f"best/{tune.metric}": float(best_trial.value)}, best_trial.number)
        parent.set_tags(
            {
                run_record.TAG_BEST_TRIAL: str(best_trial.number),
                run_record.TAG_BEST_PARAMS: json.dumps(best_trial.params),
            }
        )
    text = _rows_csv(rows)
    write_text(out / run_record.TRIALS_FILE, text)
    parent.log_text(text, run_record.TRIALS_FILE)
    result = StudyResult(
        study_name=study_name,
        storage=redact(storage_url),
        parent_run_id=parent.run_id,
        tracking_uri=redact(tracking_uri),
        output_dir=str(out),
        dashboard=dashboard_command(storage_url),
        rows=rows,
        best=best,
        wall_seconds=time.perf_counter() - started,
    )
    parent.log_dict(asdict(result), run_record.STUDY_SUMMARY_FILE)
    parent.end("FINISHED" if completed else "FAILED")
    return result
