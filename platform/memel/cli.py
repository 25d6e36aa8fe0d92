"""The ``memel`` command line: ``memel --help`` lists the commands."""

from __future__ import annotations

import importlib
import pkgutil

from memel import commands
from memel.commands.app import app

for _module in pkgutil.iter_modules(commands.__path__):
    if _module.name != "app":
        importlib.import_module(f"memel.commands.{_module.name}")

__all__ = ["app"]
