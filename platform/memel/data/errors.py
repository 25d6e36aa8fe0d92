"""The error raised for bad data configuration or input."""

from __future__ import annotations

from memel.errors import ConfigError, describe_validation_error, shown

__all__ = ["DataError", "describe_validation_error", "field_error"]


class DataError(ConfigError):
    """Bad data input: the message names the field, the value and what is allowed."""


def field_error(owner: str, field: str, value: object, allowed: str) -> DataError:
    """A :class:`DataError` for ``owner.field=value`` with what is allowed instead."""
    return DataError(f"{owner}.{field}: got {shown(value)}; {allowed}")
