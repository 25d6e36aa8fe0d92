"""The error every memel configuration raises, and how pydantic's errors are worded."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import ValidationError


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


def describe_validation_error(owner: str, error: ValidationError, fields: Iterable[str]) -> str:
    """One line per problem: ``Owner.field: message (got value)``; unknown fields list the allowed ones."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        if item["type"] == "extra_forbidden":
            message, shown = f"unknown field; allowed fields: {', '.join(fields)}", ""
        lines.append(f"{owner}.{field}: {message}{shown}" if field else f"{owner}: {message}{shown}")
    return "; ".join(lines)
