"""Atomic file writes: readers see the old file or the whole new one, never half of it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` through a uniquely named temporary file in the same folder.

    ``mode`` (e.g. 0o600) is set before the file appears under its name; the temporary file is
    created 0600, so a private file is never readable by others, even briefly.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644 if mode is None else mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Any) -> None:
    """``payload`` as indented, key-sorted JSON (values JSON cannot hold are written as strings)."""
    write_text(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def read_state(path: Path, missing: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON object a state file memel wrote holds (``run.json``, ``sweep.json``, ...).

    ``missing`` is returned when the file does not exist (None: it must exist); a file that is
    not a JSON object (truncated, edited, overwritten) is a ConfigError naming it and the fix.
    """
    from memel.errors import ConfigError

    if not path.is_file() and missing is not None:
        return missing
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        reason = getattr(error, "msg", None) or getattr(error, "strerror", None) or type(error).__name__
        raise ConfigError(
            f"{path}: this state file cannot be read ({reason}); restore it, or delete it to start this run's record over"
        ) from None
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{path}: this state file holds {type(loaded).__name__}, not a JSON object; restore it, or delete it to start this run's record over"
        )
    return loaded
