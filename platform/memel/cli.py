"""The ``memel`` command line: ``memel --help`` lists the commands.

Importing it loads Typer, Rich and pydantic only: each command imports torch, Ray, MLflow,
DeepSpeed, Optuna or pyarrow when it runs.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import typer

from memel import commands
from memel.commands.app import app


def whole_paragraphs(docstring: str) -> str:
    """A docstring as help text: each paragraph on one line (the terminal wraps it), paragraphs
    separated by a blank line, so that no sentence breaks where the source file wrapped it."""
    paragraphs = inspect.cleandoc(docstring).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in paragraph.splitlines()) for paragraph in paragraphs)


def _unwrap_help(group: typer.Typer) -> None:
    """Every command's help (here and in sub-groups) from its docstring, as whole paragraphs."""
    for command in group.registered_commands:
        text = command.help or (command.callback.__doc__ if command.callback else None)
        if text:
            command.help = whole_paragraphs(text)
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _unwrap_help(sub.typer_instance)


for _module in pkgutil.iter_modules(commands.__path__):
    if _module.name != "app":
        importlib.import_module(f"memel.commands.{_module.name}")
_unwrap_help(app)

__all__ = ["app", "whole_paragraphs"]
