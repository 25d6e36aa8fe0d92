"""The interface every experiment tracker implements, and helpers they share."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

from memel.redaction import SECRET_MARKERS, is_secret_key  # secret params are never logged

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]

__all__ = ["SECRET_MARKERS", "RunStatus", "Tracker", "flatten", "is_secret_key"]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as ``{"a.b.c": "value"}``; lists and other values as JSON (or str)."""
    flat: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if hasattr(value, "model_dump"):
            value = value.model_dump()
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
            if not value:
                flat[name] = "{}"
        elif isinstance(value, str):
            flat[name] = value
        else:
            try:
                flat[name] = json.dumps(value)
            except (TypeError, ValueError):
                flat[name] = str(value)
    return flat


@runtime_checkable
class Tracker(Protocol):
    """A run in some experiment tracker; every method is safe to call from the training loop."""

    def start(self) -> str:
        """Create (or resume) the run; returns its id."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested params, flattened to dotted keys; secret-looking keys are dropped."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalar metrics at ``step``."""

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_dict(self, obj: Any, artifact_file: str) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_artifact(self, path: str) -> None: ...

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything logged so far has been delivered; False on timeout."""

    def end(self, status: RunStatus = "FINISHED") -> None: ...
