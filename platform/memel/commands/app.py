"""The Typer application every ``memel`` sub-command registers on."""

from __future__ import annotations

import typer

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    help="memel: study and induce emergence by inhibiting monosemantic neurons, at scale.",
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print ratios measured side by side in one run.")
app.add_typer(bench_app, name="bench")
