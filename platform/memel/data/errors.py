"""The error raised for bad data configuration or input."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class DataError(ValueError):
    """Bad data input: the message names the field, the value and what is allowed."""


def field_error(owner: str, field: str, value: object, allowed: str) -> DataError:
    """A :class:`DataError` for ``owner.field=value`` with what is allowed instead."""
    return DataError(f"{owner}.{field}: got {value!r}; {allowed}")


def describe(name: str, error: ValidationError, fields: dict[str, Any]) -> str:
    """One line per pydantic error, naming the field, the message and the value given."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = f"unknown field; allowed fields: {', '.join(fields)}"
        value = item.get("input")
        shown = "" if item["type"] == "extra_forbidden" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{name}.{field}: {message}{shown}")
    return "; ".join(lines)
