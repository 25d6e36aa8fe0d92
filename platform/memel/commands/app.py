"""The Typer application every ``memel`` sub-command registers on."""

from __future__ import annotations

from typing import Any

import click
import typer
from typer.core import TyperGroup

from memel.errors import ConfigError


class _Commands(TyperGroup):
    """memel's command group: a ConfigError any command lets escape is one ``error:`` line, exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as error:
            from rich.console import Console

            from memel.commands.report import error_exit

            raise error_exit(Console(), error) from None


app = typer.Typer(
    cls=_Commands,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    help="memel: study and induce emergence by inhibiting monosemantic neurons, at scale.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print ratios measured side by side in one run.")
app.add_typer(bench_app, name="bench")
