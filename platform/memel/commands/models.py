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
) -> None:
    """List the model ladder: name, family, exact parameter count and inhibition presets.

    Counts are computed on the meta device, so nothing large is allocated.
    Build a model in Python with [bold]memel.models.build(name, **overrides)[/bold] and get a
    preset's module patterns with [bold]memel.models.preset_targets(name, preset)[/bold].

    Example: [bold]memel models --family decoder[/bold]
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
    table.add_column("presets")
    for row in rows:
        table.add_row(row.name, row.family, f"{row.parameters:,}", _human(row.parameters), ", ".join(row.presets))
    Console().print(table)
