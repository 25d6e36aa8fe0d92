"""``memel tune``: an Optuna study over inhibition settings, trials as training runs on Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from memel.commands.app import app
from memel.commands.report import error_exit
from memel.commands.run import (
    ADDRESS_OPTION,
    JOB_ARGUMENT,
    SET_OPTION,
    embedded_ray,
    load_or_exit,
    make_console,
    where_next,
)
from memel.errors import ConfigError


def _outcome(metrics: dict[str, Any], metric: str) -> str:
    """A finished trial's line: the study's metric, then the eval loss where that is another one."""
    shown = [metric] + (["eval/loss"] if metric != "eval/loss" else [])
    return ", ".join(f"{name} {float(metrics.get(name, float('nan'))):.4g}" for name in shown)


def _progress(console: Console, total: int, metric: str) -> tuple[Progress, Any]:
    progress = Progress(
        TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )
    task = progress.add_task("trials", total=total)

    def notify(event: str, key: str, detail: Any) -> None:
        if event == "requeued":
            progress.console.print(
                f"[yellow]{key} trial(s) an interrupted invocation left running are queued again[/yellow]"
            )
        elif event == "started":
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in detail.items())
            progress.console.print(f"[cyan]trial {key}[/cyan] started: {shown}")
        else:
            colour = {"finished": "green", "pruned": "yellow"}.get(event, "red")
            text = detail if isinstance(detail, str) else _outcome(detail.metrics, metric)
            progress.console.print(f"[{colour}]trial {key} {event}[/{colour}]: {text}")
            progress.advance(task)

    return progress, notify


@app.command("tune")
def tune_command(
    job_path: Path = JOB_ARGUMENT,
    set_: list[str] = SET_OPTION,
    trials: int | None = typer.Option(
        None, min=1, help="Finished trials the study should hold (default: tune.trials)."
    ),
    parallel: int | None = typer.Option(None, min=1, help="Trials at once (default: tune.parallel)."),
    address: str | None = ADDRESS_OPTION,
) -> None:
    """Tune inhibition (strength, top_n, mode, target preset, late start, forget step) with an
    Optuna study; every trial is a training run on Ray and an MLflow child run of the study's run.
    Starting it again continues the study. Open it with the optuna-dashboard command it prints.

    Example: [bold]memel tune jobs/tune_memel.yaml --trials 6 --parallel 2[/bold]
    """
    from memel.orchestration.study import run_study

    console = make_console()
    job = load_or_exit(console, job_path, set_, address)
    if job.tune is None:
        raise error_exit(
            console, f"tune: {job_path} has no tune section; add `tune: {{trials: 20}}` or run it with memel run"
        )
    total = trials or job.tune.trials
    console.print(
        f"[bold]memel tune[/bold] {job.tune.study_name or job.name}: up to {total} trials, {parallel or job.tune.parallel} at a time, {job.tune.direction} {job.tune.metric}"
    )
    progress, notify = _progress(console, total, job.tune.metric)
    try:
        with embedded_ray(), progress:
            result = run_study(job, address, trials=trials, parallel=parallel, progress=notify)
    except ConfigError as error:
        raise error_exit(console, error) from None
    table = Table(title=f"study {result.study_name}: {len(result.rows)} trials")
    columns = list(dict.fromkeys(key for row in result.rows for key in row if key not in ("member",)))
    for column in columns:
        table.add_column(column.removeprefix("param_"))
    for row in result.rows:
        table.add_row(
            *[f"{row.get(c):.4g}" if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns]
        )
    console.print(table)
    if result.best:
        console.print(
            f"[bold green]best[/bold green] trial {result.best['trial']}: {result.best['value']:.4f} with {result.best['params']}"
        )
    where_next(console, result.tracking_uri, result.parent_run_id, None)
    console.print(f"Optuna storage {result.storage}; open the study: [bold]{result.dashboard}[/bold]")
    if result.best is None:
        raise typer.Exit(1)
