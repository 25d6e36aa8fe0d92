"""``memel bench ...``: benchmarks that print side-by-side ratios."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from memel.commands.app import bench_app


@bench_app.command("inhibition")
def bench_inhibition_command(
    batch: int = typer.Option(8, help="Leading dim of the float32 activation."),
    seq: int = typer.Option(512, help="Sequence dim."),
    hidden: int = typer.Option(4096, help="Hidden (neuron) dim."),
    top_n: list[int] = typer.Option([1, 10, 100], "--top-n", help="Values selected per sample (repeatable)."),
    repeats: int = typer.Option(7, help="Interleaved timing pairs per row; the median ratio is reported."),
    track_every: int = typer.Option(1, help="Snapshot tracking interval (InhibitionConfig.track_every)."),
    threads: int = typer.Option(0, help="torch threads (0 = torch's default)."),
    kernel: list[str] = typer.Option(["eager", "compiled"], "--kernel", help="Hot-path kernels to time (repeatable)."),
) -> None:
    """Time the Inhibitor (rd mode) forward+backward against a plain h*1.0 on the same tensor.

    Example: [bold]memel bench inhibition --top-n 1 --top-n 10[/bold]
    """
    import torch

    from memel.benchmarks.inhibition import bench_inhibition

    if threads:
        torch.set_num_threads(threads)
    rows = bench_inhibition((batch, seq, hidden), top_ns=top_n, repeats=repeats, track_every=track_every, kernels=kernel)
    table = Table(title=f"Inhibitor fwd+bwd / (h*1.0) fwd+bwd, float32 [{batch}, {seq}, {hidden}], {torch.get_num_threads()} threads")
    for column in ("kernel", "layout", "top_n", "module ms", "h*1.0 ms", "median ratio", "best/best"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row.kernel, row.layout, str(row.top_n), f"{row.module_ms:.1f}", f"{row.baseline_ms:.1f}", f"{row.ratio:.2f}x", f"{row.best_ratio:.2f}x")
    Console().print(table)
