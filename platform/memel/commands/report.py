"""How a command reports bad input: one red ``error:`` line (markup-safe, bounded), exit code 2."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from memel.errors import one_line


def error_exit(console: Console, error: Exception | str, code: int = 2) -> typer.Exit:
    """Print ``error`` as one ``error:`` line and return the exit to raise (``raise error_exit(...)``)."""
    console.print(f"[red]error:[/red] {escape(one_line(str(error)))}", soft_wrap=True)
    return typer.Exit(code)
