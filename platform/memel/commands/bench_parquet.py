"""``memel bench parquet``: throughput of the Parquet statistics sink."""

from __future__ import annotations

import typer

from memel.commands.app import bench_app


@bench_app.command("parquet")
def bench_parquet_command(
    modules: int = typer.Option(24, help="Modules per snapshot (one table each)."),
    neurons: int = typer.Option(4096, help="Neurons per module (rows per table)."),
    snapshots: int = typer.Option(20, help="Snapshots (steps) written."),
    root: str = typer.Option("", help="Where to write (default: a fresh temp dir, removed afterwards)."),
    compression: str = typer.Option("lz4", help="Parquet compression codec."),
) -> None:
    """Write snapshot tables through ParquetStatsSink and print neuron rows/s and submit() latency.

    Example: [bold]memel bench parquet --modules 24 --neurons 4096[/bold]
    """
    from memel.benchmarks.parquet import bench_parquet

    r = bench_parquet(modules, neurons, snapshots, root or None, compression)
    print(
        f"{r.rows:,} neuron rows ({r.snapshots} snapshots x {r.modules} modules x {r.neurons} neurons) "
        f"in {r.seconds:.2f}s: {r.rows_per_s / 1e6:.2f}M rows/s written ({r.files} files, {compression}); "
        f"snapshot_table {r.table_rows_per_s / 1e6:.2f}M rows/s; "
        f"submit() blocks median {r.submit_median_us:.0f}us, max {r.submit_max_us:.0f}us"
    )
