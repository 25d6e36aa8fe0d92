"""``memel models``: the model ladder with exact parameter counts and inhibition presets."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from memel.commands.app import app


def _human(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)


@app.command("models")
def models(
    family: Annotated[
        str | None,
        typer.Option("--family", "-f", help="Only this family: decoder, encoder, vit, cnn or convgru."),
    ] = None,
    stats: Annotated[
        bool,
        typer.Option(
            "--stats", help="Add the modelled statistics cost: neurons, memory per rank and bytes all-reduced per step."
        ),
    ] = False,
    layout: Annotated[str, typer.Option("--layout", help="With --stats: the layout, element or channel.")] = "element",
    preset: Annotated[str, typer.Option("--preset", help="With --stats: the inhibition preset.")] = "paper",
    seq_len: Annotated[int, typer.Option("--seq-len", min=1, help="With --stats: tokens per sequence.")] = 2048,
    shard_ranks: Annotated[
        int,
        typer.Option(
            "--shard-ranks",
            min=1,
            help="With --stats: ranks the statistics are sharded over (execution.shard_statistics); 1: replicated.",
        ),
    ] = 1,
) -> None:
    """List the model ladder: name, family, exact parameter count and inhibition presets.

    Counts are computed on the meta device, so nothing large is allocated.
    Build a model in Python with [bold]memel.models.build(name, **overrides)[/bold] and get a
    preset's module patterns with [bold]memel.models.preset_targets(name, preset)[/bold].

    With --stats, each model with the preset also shows what its inhibitors' statistics cost
    (a model, see docs/scaling.md): neurons, memory per rank against the bf16 parameters, and
    bytes all-reduced per optimizer step; with --shard-ranks W, sharded over W ranks: memory per
    rank and bytes reduce-scattered and all-gathered per training call.

    Example: [bold]memel models --family decoder --stats --layout element --shard-ranks 8[/bold]
    """
    from memel.errors import ConfigError
    from memel.models import list_models

    try:
        rows = list_models(family)
    except ConfigError as error:
        raise typer.BadParameter(str(error), param_hint="--family") from None
    table = Table(title="memel model ladder")
    table.add_column("name", style="bold")
    table.add_column("family")
    table.add_column("parameters", justify="right")
    table.add_column("", justify="right", style="dim")
    if not stats:
        table.add_column("presets")
    else:
        if layout not in ("element", "channel"):
            raise typer.BadParameter(f"unknown layout {layout!r}; allowed: element, channel", param_hint="--layout")
        moved = "moved/call" if shard_ranks > 1 else "all-reduce/step"
        for column in ("positions", "neurons", "state/rank", "% of bf16", moved):
            table.add_column(column, justify="right")
    for row in rows:
        cells = [row.name, row.family, f"{row.parameters:,}", _human(row.parameters)]
        if stats:
            cells += _stats_cells(row.name, row.presets, layout, preset, seq_len, shard_ranks)
        else:
            cells.append(", ".join(row.presets))
        table.add_row(*cells)
    Console().print(table)


def _stats_cells(
    name: str, presets: tuple[str, ...], layout: str, preset: str, seq_len: int, shard_ranks: int
) -> list[str]:
    from memel.benchmarks.statistics_cost import statistics_cost

    if preset not in presets:
        return ["-"] * 5
    try:
        cost = statistics_cost(name, layout, preset, seq_len, shard_ranks)
    except ValueError:  # a model family the cost model does not cover
        return ["-"] * 5
    return [
        str(cost.positions),
        _human(cost.neurons),
        _bytes(cost.state_bytes),
        f"{100 * cost.state_fraction:.1f}",
        _bytes(cost.payload_bytes),
    ]


def _bytes(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count} B"
