"""How a command reports bad input: one red ``error:`` line (markup-safe, bounded), exit code 2;
and how a training command reports how its run ended (:func:`reported_run`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from memel.errors import ConfigError, one_line


def error_exit(console: Console, error: Exception | str, code: int = 2) -> typer.Exit:
    """Print ``error`` as one ``error:`` line and return the exit to raise (``raise error_exit(...)``)."""
    console.print(f"[red]error:[/red] {escape(one_line(str(error)))}", soft_wrap=True)
    return typer.Exit(code)


@contextlib.contextmanager
def reported_run(console: Console, name: str) -> Iterator[None]:
    """How a run of ``name`` ends on the terminal: a refused spec is one ``error:`` line (exit 2);
    Ctrl-C says so with the command that resumes it (exit 130); any other failure is its root
    cause on one line (exit 1; the traceback above it is Ray's and the workers')."""
    from memel.training.interrupt import INTERRUPTED_EXIT, describe, resume_command

    try:
        yield
    except typer.Exit:
        raise
    except ConfigError as error:
        raise error_exit(console, error) from None
    except KeyboardInterrupt:
        console.print(
            f"[yellow]interrupted:[/yellow] {escape(name)} stopped; resume it with: [bold]{escape(resume_command())}[/bold]",
            soft_wrap=True,
        )
        raise typer.Exit(INTERRUPTED_EXIT) from None
    except Exception as error:
        raise error_exit(console, f"the run failed: {describe(error)}", code=1) from None
