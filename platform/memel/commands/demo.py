"""``memel demo``: a small LM trained with and without inhibition on the offline corpus."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from memel.commands.app import app


@app.command("demo")
def demo_command(
    model: str = typer.Option("byte-0.2m", help="Model from `memel models` (a byte-vocabulary LM)."),
    mode: list[str] = typer.Option(["original", "rd"], "--mode", help="Inhibition modes to compare (repeatable)."),
    steps: int = typer.Option(300, min=1, help="Optimizer steps per run."),
    batch_size: int = typer.Option(16, min=1),
    seq_len: int = typer.Option(64, min=1),
    preset: str = typer.Option("mlp", help="Where to insert inhibition (a preset of the model)."),
    strength: float = typer.Option(1.0, help="D for mode rd."),
    top_n: int = typer.Option(1, min=1, help="Values inhibited per sample."),
    threads: int = typer.Option(2, min=1, help="torch CPU threads."),
    seed: int = typer.Option(0),
) -> None:
    """Train the same small LM once per inhibition mode on the offline Shakespeare corpus and
    print a comparison (loss, values inhibited, Monosemantic Scale summary).

    Example: [bold]memel demo --mode original --mode rd --mode naive_b --steps 200[/bold]
    """
    import torch

    from memel.demo import run_demo

    torch.set_num_threads(threads)
    console = Console()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        tasks = {m: progress.add_task(f"{m:>8}", total=steps, loss=float("nan")) for m in mode}

        def on_step(run_mode: str, step: int, loss: float) -> None:
            progress.update(tasks[run_mode], completed=step + 1, loss=loss)

        results = run_demo(model, mode, steps, batch_size, seq_len, preset, strength, top_n, seed=seed, on_step=on_step)
    table = Table(
        title=f"{model}, preset {preset}, {steps} steps of {batch_size}x{seq_len} tokens (top_n={top_n}, D={strength:g})"
    )
    for column in (
        "mode",
        "train loss",
        "held-out loss",
        "values inhibited",
        "mean MS",
        "max MS",
        "frac MS>9",
        "seconds",
    ):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r.mode,
            f"{r.train_loss:.4f}",
            f"{r.heldout_loss:.4f}",
            f"{r.inhibited:,}",
            f"{r.mean_ms:.3f}",
            f"{r.max_ms:.1f}",
            f"{r.frac_above:.4f}",
            f"{r.seconds:.1f}",
        )
    console.print(table)
    console.print(
        "MS statistics cover the steps since the last snapshot (the whole run here). Next: `memel bench inhibition`."
    )
