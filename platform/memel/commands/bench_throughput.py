"""``memel bench throughput``: training rate of the ladder's language models."""

from __future__ import annotations

import typer

from memel.commands.app import bench_app

#: ``--model`` (a module-level default: a list default built in the signature is a shared mutable call).
MODEL_OPTION = typer.Option(["byte-1m", "byte-4m"], "--model", help="Decoder model from `memel models` (repeatable).")


@bench_app.command("throughput")
def bench_throughput_command(
    model: list[str] = MODEL_OPTION,
    batch: int = typer.Option(16, help="Sequences per step."),
    seq: int = typer.Option(256, help="Tokens per sequence."),
    steps: int = typer.Option(10, help="Timed steps per model."),
    warmup: int = typer.Option(3, help="Untimed steps first."),
    threads: int = typer.Option(2, help="torch CPU threads (0 = torch's default)."),
    device: str = typer.Option("cpu", help="Where the model trains: cpu, cuda or cuda:N."),
) -> None:
    """Training rate (forward, backward and an AdamW step on random tokens) of each model: tokens per second of the median step and of the best step, the one least disturbed by other processes.

    Example: [bold]memel bench throughput --model byte-0.2m --model byte-1m --seq 64[/bold]
    """
    import torch
    from rich.console import Console

    from memel.benchmarks.throughput import bench_throughput
    from memel.errors import ConfigError

    console = Console()
    if threads:
        torch.set_num_threads(threads)
    try:
        rows = bench_throughput(model, batch, seq, steps, warmup, device)
    except ConfigError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    console.print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, batch {batch} x seq {seq}, {steps} steps"
    )
    for row in rows:
        console.print(
            f"{row.model:>10}  {row.parameters:>12,} params  {row.median_tokens_per_s:>10,.0f} tokens/s (median step)  "
            f"{row.best_tokens_per_s:>10,.0f} (best step)"
        )
