"""``memel train``: one training run from a spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from memel.commands.app import app
from memel.commands.report import error_exit, reported_run
from memel.errors import ConfigError


@app.command("train")
def train_command(
    spec_path: Path = typer.Argument(..., metavar="SPEC.yaml", help="Training-run spec (see jobs/smoke.yaml)."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: dotted.key=value (repeatable)."),
    address: str | None = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)."),
) -> None:
    """Train one model with inhibition on Ray Train + DeepSpeed, tracked in MLflow, with
    per-neuron statistics written as Parquet. Running the same spec again resumes it.

    Example: [bold]memel train jobs/smoke.yaml --set train.steps=40 --set inhibition.strength=2[/bold]
    """
    from memel.training import load_spec, run_training
    from memel.training.preflight import preflight

    console = Console()
    try:
        spec = load_spec(spec_path, set_)
        preflight(spec, address)
    except ConfigError as error:
        raise error_exit(console, error) from None
    console.print(
        f"[bold]memel train[/bold] {spec.run_name}: {spec.model.name}, {spec.train.workers} workers, ZeRO {spec.train.zero_stage}, {spec.train.steps} steps"
    )
    with reported_run(console, spec.run_name):
        result = run_training(spec, address)
    print_result(console, result)


def print_result(console: Console, result: Any) -> None:
    """The run's final metrics and where its outputs are."""
    table = Table(title=f"{result.run_name} finished in {result.wall_seconds:,.0f} s", show_header=False)
    for key in ("train/loss", "eval/loss", "ms/mean", "ms/frac_above", "step", "tokens_seen"):
        if key in result.metrics:
            value = result.metrics[key]
            table.add_row(key, f"{value:,.4f}" if isinstance(value, float) else str(value))
    table.add_row("MLflow run", f"{result.run_id} at {result.tracking_uri}")
    table.add_row("Parquet statistics", str(result.stats_root))
    table.add_row("last checkpoint", str(result.checkpoint))
    console.print(table)
    if result.tracking_uri and not result.tracking_uri.startswith("http"):
        console.print(f"Browse it: [bold]mlflow ui --backend-store-uri {result.tracking_uri}[/bold]")
