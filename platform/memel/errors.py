"""The error every memel configuration raises, how pydantic's errors are worded, and a diverged run's error."""

from __future__ import annotations

import re
import reprlib
import types
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


#: Most characters of a value quoted in an error message.
MAX_SHOWN = 80
#: Most characters of a whole error message (the backstop for messages that quote much).
MAX_MESSAGE = 2000


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the run diverged and cannot recover."""

    def __init__(self, step: int, loss: float, lr: float) -> None:
        self.step, self.loss, self.lr = step, loss, lr
        super().__init__(
            f"training loss became non-finite at step {step} (train/loss={loss}, lr={lr:g}); "
            "lower train.lr (or raise train.warmup_steps) and run it again"
        )

    def __reduce__(self) -> tuple[Any, tuple[int, float, float]]:
        return type(self), (self.step, self.loss, self.lr)


def shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)``, cut to ``limit`` characters with an ellipsis (a huge input stays readable)."""
    text = reprlib_repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def reprlib_repr(value: Any) -> str:
    """A repr that does not expand a huge container: containers show their first items only."""
    limits = reprlib.Repr()
    limits.maxlevel, limits.maxdict, limits.maxlist, limits.maxtuple, limits.maxset = 3, 6, 8, 8, 8
    limits.maxstring = limits.maxother = limits.maxlong = MAX_SHOWN
    try:
        return limits.repr(value)
    except ValueError:  # an int too long to print
        return f"<{type(value).__name__} too long to show>"


def one_line(message: str, limit: int = MAX_MESSAGE) -> str:
    """``message`` on one line, cut to ``limit`` characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``X``, ``X | None``, ``list[X]`` or ``dict[str, X]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, dict):
        for argument in typing.get_args(annotation):
            found = _nested_model(argument)
            if found is not None:
                return found
    return None


def _allowed_at(fields: Iterable[str], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed where an unknown key sits: the nested section's own fields."""
    model_fields = getattr(fields, "items", None)
    if model_fields is None:
        return list(fields)
    current: dict[str, Any] = dict(fields)  # type: ignore[arg-type]
    for part in loc[:-1]:
        info = current.get(str(part))
        if info is None:
            continue  # a list index or dict key: stay with the model we are in
        model = _nested_model(getattr(info, "annotation", None))
        if model is None:
            break
        current = dict(model.model_fields)
    return list(current)


#: A message a nested memel config raised: ``ClassName.field: ...``.
_NESTED = re.compile(r"^[A-Z][A-Za-z]+\.(\S+: .*)$")


def describe_validation_error(owner: str, error: ValidationError, fields: Iterable[str]) -> str:
    """One line per problem: ``Owner.field: message (got value)``; unknown fields list the allowed ones.

    ``fields`` is the top model's ``model_fields`` (or plain names); an unknown key inside a
    nested section lists that section's fields.
    """
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        quoted = "" if isinstance(value, dict) else f" (got {shown(value)})"
        if item["type"] == "extra_forbidden":
            allowed = _allowed_at(fields, tuple(item["loc"]))
            message, quoted = f"unknown field; allowed fields: {', '.join(allowed)}", ""
        nested = [_NESTED.match(part) for part in message.split("; ")]
        if field and nested and all(nested):  # a nested config's own error: re-rooted at this field
            lines.extend(f"{owner}.{field}.{match[1]}" for match in nested if match)
            continue
        lines.append(f"{owner}.{field}: {message}{quoted}" if field else f"{owner}: {message}{quoted}")
    return "; ".join(lines)
