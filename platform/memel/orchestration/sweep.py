"""A scale sweep: one MLflow parent run, one child training run per member, a final table.

Outputs go under the job's output dir (``runs/<job>/`` by default): ``sweep.json`` (the parent
run id, so running the job again reuses it), ``members/<key>/`` per member (its run id,
summary and checkpoints), ``stats/`` (one Parquet dataset for every member, partitioned by
run id) and ``sweep_table.csv``. Running the job again skips finished members and resumes
interrupted ones from their last checkpoint.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memel import run_record
from memel.atomic import read_state, write_json, write_text
from memel.errors import ConfigError
from memel.models import count_parameters
from memel.redaction import redact
from memel.training import TrainResult, TrainSpec, init_ray
from memel.training.interrupt import mark_killed
from memel.training.run_lock import hold_lock
from memel.training.runner import resolve_outputs

from .job import JobSpec, Member, attach, expand_sweep
from .launch import Finished, Launcher, noting_interrupts
from .sweep_folders import check_folders, sweep_claim

#: The columns of the sweep table, in order.
COLUMNS = (
    "member",
    "rung",
    "params",
    "mode",
    "strength",
    "top_n",
    "seed",
    "status",
    "eval_loss",
    "eval_metric",
    "ms_mean",
    "mono_ratio",
    "mono_p",
    "inhibited",
    "wall_s",
    "run_id",
)


@dataclass
class SweepResult:
    """A finished (or partly failed) sweep: the table and where everything is."""

    job: str
    parent_run_id: str
    tracking_uri: str
    stats_root: str | None
    output_dir: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0
    mono_criterion: str | None = None  # the monosemantic ratio's criterion and null, or why it is not measurable


def finished_result(spec: TrainSpec) -> TrainResult | None:
    """The member's result when a previous invocation already finished it (same spec), else None."""
    summary = spec.out / run_record.SUMMARY_FILE
    if not summary.exists():
        return None
    saved = read_state(summary)
    if saved.get("run_name") != spec.run_name:
        return None
    return TrainResult(**saved)


def _member_run_id(spec: TrainSpec) -> str | None:
    """The MLflow run id a member's folder records (None before its run started)."""
    try:
        return read_state(spec.out / run_record.RUN_FILE, missing={}).get("run_id")
    except ConfigError:  # unreadable: no run to mark
        return None


def table_row(member: Member, result: TrainResult | None, status: str, n_params: int) -> dict[str, Any]:
    """One row of the sweep table."""
    metrics = result.metrics if result else {}
    eval_metric = metrics.get("eval/perplexity", metrics.get("eval/accuracy"))
    return {
        "member": member.key,
        "rung": member.rung,
        "params": n_params,
        "mode": member.mode,
        "strength": member.strength,
        "top_n": member.top_n,
        "seed": member.seed,
        "status": status,
        "eval_loss": metrics.get("eval/loss"),
        "eval_metric": eval_metric,
        "ms_mean": metrics.get("ms/mean"),
        "mono_ratio": None,
        "mono_p": None,
        "inhibited": metrics.get("inhibited/total"),
        "wall_s": round(result.wall_seconds, 1) if result else None,
        "run_id": result.run_id if result else None,
    }


def add_mono_ratios(rows: list[dict[str, Any]], members: list[Member], stats_root: str | None) -> str | None:
    """Fill each row's ``mono_ratio`` and ``mono_p`` (the final monosemantic ratio of
    ``memel analyze`` and its p-value against featureless neurons; None where not measurable);
    returns the criterion with its null, or why there is no ratio."""
    from memel.analysis.monosemantic_ratio import Criterion, final_ratios

    thresholds = {m.spec.inhibition.ms_threshold for m in members}
    if stats_root is None or len(thresholds) != 1:
        return None if stats_root is None else "members recorded different ms_threshold values: see memel analyze"
    (threshold,) = thresholds
    criterion = Criterion(threshold=threshold)
    if not criterion.calibrated:
        return f"monosemantic ratio not measurable: {criterion.null_text()}"
    try:
        by_key = {m.key: m for m in members}
        every = {row["run_id"]: by_key[row["member"]].spec.inhibition.track_every for row in rows if row["run_id"]}
        ratios = final_ratios(stats_root, threshold, every)
    except Exception as error:  # noqa: BLE001 - the table stands without it; say why
        return f"monosemantic ratio not computed ({type(error).__name__}: {error})"
    for row in rows:
        found = ratios.get(row["run_id"] or "")
        if found and found["ratio"] == found["ratio"]:  # not NaN
            row["mono_ratio"], row["mono_p"] = found["ratio"], found["p_value"]
    return f"{criterion.describe()}; null: {criterion.null_text()}"


def table_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _parent_run(job: JobSpec, out: Path, tracking_uri: str, members: list[Member]) -> Any:
    from memel.tracking import flatten, start_recorded_run

    tracker, new = start_recorded_run(
        out / run_record.SWEEP_FILE,
        "parent_run_id",
        lambda run_id: {
            "job": job.name,
            "fingerprint": job.base_fingerprint(),
            "parent_run_id": run_id,
            "tracking_uri": redact(tracking_uri),
        },
        tracking_uri,
        job.tracking.experiment,
        job.name,
    )
    if new:
        sweep = job.sweep.model_dump(mode="json") if job.sweep else {}
        tracker.log_params(flatten({"sweep": sweep, "base": job.base_tree()}))
        tracker.set_tags(
            {
                run_record.TAG_KIND: run_record.KIND_SWEEP,
                run_record.TAG_SWEEP: job.name,
                run_record.TAG_MEMBERS: str(len(members)),
                run_record.TAG_RUNGS: ",".join(dict.fromkeys(m.rung for m in members)),
                run_record.TAG_MODES: ",".join(dict.fromkeys(m.mode for m in members)),
                **job.tracking.tags,
            }
        )
        tracker.log_dict(job.model_dump(mode="json"), run_record.JOB_FILE)
    return tracker


def run_sweep(job: JobSpec, address: str | None = None, progress: Any = None) -> SweepResult:
    """Run every member not yet finished (concurrently as far as resources allow); blocks until all end.

    ``progress`` (optional) is called as ``progress(event, member_key, detail)`` with event
    ``skipped``, ``started`` or ``finished``/``failed``. One invocation at a time per output dir:
    a second one raises RunLocked (a ConfigError) before writing anything, and so does a folder
    (the sweep's or a member's) that holds a run of another spec.
    """
    check_folders(job)
    with hold_lock(job.out.resolve()):
        return _run_sweep(job, address, progress)


def _run_sweep(job: JobSpec, address: str | None, progress: Any) -> SweepResult:
    started = time.perf_counter()
    members = expand_sweep(job)
    out, tracking_uri, stats_root, _ = resolve_outputs(job, sweep_claim(job))
    notify = progress or (lambda *_: None)
    parent = _parent_run(job, out, tracking_uri, members)
    tags = {run_record.TAG_SWEEP: job.name, run_record.TAG_KIND: run_record.KIND_SWEEP_MEMBER}
    specs = {
        m.key: attach(
            m.spec,
            tracking_uri,
            parent.run_id,
            stats_root,
            {**tags, run_record.TAG_MEMBER: m.key, run_record.TAG_VARIANT: m.mode},
        )
        for m in members
    }
    by_key = {m.key: m for m in members}
    params = {m.rung: count_parameters(m.spec.model.name, **m.spec.model.overrides) for m in members}
    rows: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    to_run: list[tuple[str, TrainSpec]] = []
    for member in members:
        done = finished_result(specs[member.key])
        if done is not None:
            rows[member.key] = table_row(member, done, "done before", params[member.rung])
            notify("skipped", member.key, done)
        else:
            to_run.append((member.key, specs[member.key]))

    def on_finished(outcome: Finished) -> None:
        member = by_key[outcome.key]
        if outcome.result is not None:
            summary = specs[outcome.key].out / run_record.SUMMARY_FILE  # also here when the member ran elsewhere
            write_json(summary, asdict(outcome.result))
            rows[outcome.key] = table_row(member, outcome.result, "finished", params[member.rung])
            notify("finished", outcome.key, outcome.result)
        else:
            failed.append(outcome.key)
            rows[outcome.key] = table_row(member, None, "failed", params[member.rung])
            notify("failed", outcome.key, outcome.error)

    launcher = None
    try:
        if to_run:
            init_ray(address, max(spec.train.workers for _, spec in to_run))
            launcher = Launcher(job.sweep.max_concurrent if job.sweep else None)
            with noting_interrupts():
                launcher.run_all(to_run, on_finished, on_launch=lambda key: notify("started", key, None))
    except BaseException:
        if launcher is not None:
            launcher.stop_all()
        in_flight = [key for key, _ in to_run if key not in rows]
        mark_killed(tracking_uri, [rid for key in in_flight if (rid := _member_run_id(specs[key]))])
        parent.end("KILLED")
        raise
    ordered = [rows[m.key] for m in members if m.key in rows]
    criterion = add_mono_ratios(ordered, members, stats_root)
    text = table_csv(ordered)
    write_text(out / run_record.SWEEP_TABLE_CSV, text)
    parent.log_text(text, run_record.SWEEP_TABLE_CSV)
    parent.log_dict(
        {"columns": list(COLUMNS), "data": [[row[c] for c in COLUMNS] for row in ordered]}, run_record.SWEEP_TABLE_JSON
    )
    for row in ordered:
        if row["eval_loss"] is not None:
            parent.log_metrics({f"eval_loss/{row['member']}": float(row["eval_loss"])}, 0)
    result = SweepResult(
        job=job.name,
        parent_run_id=parent.run_id,
        tracking_uri=redact(tracking_uri),
        stats_root=stats_root,
        output_dir=str(out),
        rows=ordered,
        failed=failed,
        wall_seconds=time.perf_counter() - started,
        mono_criterion=criterion,
    )
    parent.log_dict(asdict(result), run_record.SWEEP_SUMMARY_FILE)
    parent.end("FAILED" if failed else "FINISHED")
    return result
