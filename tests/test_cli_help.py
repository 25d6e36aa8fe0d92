"""Every command's help reads as whole sentences: a docstring paragraph is one line of help text
(the terminal wraps it), never broken where the source file wrapped it."""

from __future__ import annotations

import re

import typer.main
from typer.testing import CliRunner

from memel.cli import app, whole_paragraphs


def test_whole_paragraphs_joins_wrapped_lines_and_keeps_paragraphs() -> None:
    doc = """First sentence wrapped
    in the source. Second one.

    Example: [bold]memel x[/bold]
    (or y)
    """
    assert (
        whole_paragraphs(doc)
        == "First sentence wrapped in the source. Second one.\n\nExample: [bold]memel x[/bold] (or y)"
    )


def _commands() -> list[tuple[list[str], object]]:
    found = []

    def walk(group: object, path: list[str]) -> None:
        for name, command in getattr(group, "commands", {}).items():
            found.append(([*path, name], command))
            walk(command, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


def test_every_command_help_shows_each_paragraph_unbroken() -> None:
    runner = CliRunner()
    commands = _commands()
    assert len(commands) > 15
    for path, command in commands:
        paragraphs = [re.sub(r"\[/?bold\]", "", p) for p in (command.help or "").split("\n\n")]
        assert paragraphs[0], f"memel {' '.join(path)} has no help"
        assert all("\n" not in p for p in paragraphs), path
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "2000", "TERMINAL_WIDTH": "2000"})
        assert result.exit_code == 0, result.output
        shown = " ".join(result.output.split())  # the box drawing's padding aside
        for paragraph in paragraphs:
            assert " ".join(paragraph.split()) in shown, (path, paragraph)
        lines = [line.strip(" │") for line in result.output.splitlines()]
        assert paragraphs[0].strip() in lines, f"memel {' '.join(path)} --help breaks its first paragraph"
