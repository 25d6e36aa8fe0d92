"""``memel validate`` and ``memel run``: check a job spec; run it (one training run or a sweep)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from memel.commands.app import app
from memel.commands.report import error_exit, reported_run
from memel.errors import ConfigError

JOB_ARGUMENT = typer.Argument(..., metavar="JOB.yaml", help="Job spec (see jobs/).")
SET_OPTION = typer.Option([], "--set", help="Override a field: dotted.key=value (repeatable), e.g. sweep.seeds=[0,1].")
ADDRESS_OPTION = typer.Option(
    None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray in this process)."
)


def load_or_exit(
    console: Console, path: Path, overrides: list[str], address: str | None = None, connect: bool = True
) -> Any:
    """The validated job, checked against where it runs (``memel.training.preflight``), or a red
    error line and exit code 2 (nothing written). ``connect=False``: no cluster connection."""
    from memel.orchestration import load_job
    from memel.orchestration.job import preflight_job

    try:
        job = load_job(path, overrides)
        preflight_job(job, address, connect=connect)
    except ConfigError as error:
        raise error_exit(console, error) from None
    return job


def make_console() -> Console:
    """A console whose tables fit: at least 160 columns when output goes to a file or pipe."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 160))


@contextlib.contextmanager
def embedded_ray() -> Iterator[None]:
    """Shut down the Ray instance the command started itself (flushing worker logs before the
    final table); leave one that was already running alone."""
    import ray

    started_here = not ray.is_initialized()
    try:
        yield
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()


def job_kind(job: Any) -> str:
    return "study" if job.tune is not None else "sweep" if job.sweep is not None else "run"


@app.command("validate")
def validate_command(
    job_path: Path = JOB_ARGUMENT,
    set_: list[str] = SET_OPTION,
    address: str | None = typer.Option(None, help="Check for this Ray cluster, not this machine (nothing connects)."),
) -> None:
    """Check a job spec (every sweep member too) without running anything; show what it would run.
    Without --address (or RAY_ADDRESS) it also checks this machine: data paths, CPUs, memory.

    Example: [bold]memel validate jobs/quickstart.yaml --set sweep.seeds=[0,1][/bold]
    """
    from memel.orchestration import expand_sweep

    console = make_console()
    job = load_or_exit(console, job_path, set_, address, connect=False)
    kind = job_kind(job)
    console.print(f"[green]valid[/green] {job_path}: {kind} [bold]{job.name}[/bold], outputs under {job.out}/")
    if kind == "sweep":
        table = Table("member", "model", "mode", "D", "top_n", "seed", "steps", "workers")
        for member in expand_sweep(job):
            spec = member.spec
            table.add_row(
                member.key,
                member.rung,
                member.mode,
                f"{member.strength:g}",
                str(member.top_n),
                str(member.seed),
                str(spec.train.steps),
                str(spec.train.workers),
            )
        console.print(table)
    elif kind == "study":
        tune = job.tune
        console.print(
            f"{tune.trials} trials ({tune.parallel} at a time), {tune.sampler} sampler, {tune.direction} {tune.metric}; run it with [bold]memel tune {job_path}[/bold]"
        )
    else:
        console.print(
            f"{job.model.name}, {job.train.steps} steps, {job.train.workers} workers, ZeRO {job.train.zero_stage}; run it with [bold]memel run {job_path}[/bold]"
        )


def _sweep_progress(console: Console, total: int) -> tuple[Progress, Any]:
    progress = Progress(
        TextColumn("[bold]sweep members"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task("members", total=total)

    def notify(event: str, key: str, detail: Any) -> None:
        if event == "started":
            progress.console.print(f"[cyan]started[/cyan]  {key}")
            return
        if event == "skipped":
            progress.console.print(f"[dim]skipped[/dim]  {key} (finished before)")
        elif event == "finished":
            loss = detail.metrics.get("eval/loss")
            progress.console.print(
                f"[green]finished[/green] {key}: eval loss {loss:.4f} in {detail.wall_seconds:,.0f} s"
                if loss is not None
                else f"[green]finished[/green] {key}"
            )
        else:
            progress.console.print(f"[red]failed[/red]   {key}: {detail}")
        progress.advance(task)

    return progress, notify


def _number(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _mono(row: dict[str, Any]) -> str:
    """The final monosemantic ratio, marked (n.s.) when featureless neurons would give it as often (p >= 0.05)."""
    if row.get("mono_ratio") is None:
        return "-"
    text = _number(row["mono_ratio"], 3)
    return text if row.get("mono_p") is not None and row["mono_p"] < 0.05 else f"{text} (n.s.)"


def print_sweep(console: Console, result: Any) -> None:
    table = Table(title=f"sweep {result.job}: {len(result.rows)} members in {result.wall_seconds:,.0f} s")
    for column in (
        "member",
        "params",
        "mode",
        "D",
        "top_n",
        "seed",
        "eval loss",
        "eval metric",
        "MS mean",
        "mono ratio",
        "inhibited",
        "wall s",
        "status",
    ):
        table.add_column(column, justify="left" if column in ("member", "mode", "status") else "right")
    for row in result.rows:
        table.add_row(
            row["member"],
            _number(row["params"]),
            row["mode"],
            _number(row["strength"]),
            str(row["top_n"]),
            str(row["seed"]),
            _number(row["eval_loss"]),
            _number(row["eval_metric"]),
            _number(row["ms_mean"]),
            _mono(row),
            _number(row["inhibited"]),
            _number(row["wall_s"]),
            row["status"],
        )
    console.print(table)
    if getattr(result, "mono_criterion", None):
        console.print(
            f"mono ratio: {result.mono_criterion}. (n.s.): not significant against it (p >= 0.05); "
            "-: not measurable. One seed is one run: compare rungs and modes with memel analyze."
        )
    where_next(console, result.tracking_uri, result.parent_run_id, result.stats_root)
    console.print(f"Table: {Path(result.output_dir) / 'sweep_table.csv'} (also an artifact of the parent run)")


def where_next(console: Console, tracking_uri: str, run_id: str, stats_root: str | None) -> None:
    console.print(f"MLflow parent run {run_id} at {tracking_uri}")
    if tracking_uri.startswith("http"):
        console.print(f"  open {tracking_uri.rstrip('/')}/#/experiments (children are nested under the parent run)")
    else:
        console.print(f"  browse: [bold]mlflow ui --backend-store-uri {tracking_uri}[/bold]")
    if stats_root:
        console.print(f"Parquet neuron statistics: {stats_root} (partitioned by run_id and module)")


@app.command("run")
def run_command(
    job_path: Path = JOB_ARGUMENT, set_: list[str] = SET_OPTION, address: str | None = ADDRESS_OPTION
) -> None:
    """Run a job spec: one training run, or a sweep (rungs x modes x strengths x top_n x seeds) as one
    MLflow parent run with a child run per member. Outputs go under runs/<job name>/. Running the
    job again skips finished members and resumes interrupted ones.

    Example: [bold]memel run jobs/quickstart.yaml[/bold]   (on a node of a cluster: --address auto; from elsewhere: memel submit)
    """
    console = make_console()
    job = load_or_exit(console, job_path, set_, address)
    kind = job_kind(job)
    if kind == "study":
        raise error_exit(
            console, f"tune: {job_path} is a study (it has a tune section); run it with memel tune {job_path}"
        )
    with reported_run(console, str(job_path)):
        if kind == "run":
            from memel.commands.train import print_result
            from memel.training import TrainSpec, run_training

            spec = TrainSpec(**job.base_tree())
            console.print(
                f"[bold]memel run[/bold] {spec.run_name}: {spec.model.name}, {spec.train.workers} workers, ZeRO {spec.train.zero_stage}, {spec.train.steps} steps"
            )
            with embedded_ray():
                outcome = run_training(spec, address)
            print_result(console, outcome)
            return
        from memel.orchestration import expand_sweep
        from memel.orchestration.sweep import run_sweep

        members = expand_sweep(job)
        console.print(f"[bold]memel run[/bold] sweep {job.name}: {len(members)} members, outputs under {job.out}/")
        progress, notify = _sweep_progress(console, len(members))
        with embedded_ray(), progress:
            result = run_sweep(job, address, progress=notify)
    print_sweep(console, result)
    if result.failed:
        console.print(
            f"[red]{len(result.failed)} member(s) failed:[/red] {', '.join(result.failed)}; run the job again to retry them"
        )
        raise typer.Exit(1)
