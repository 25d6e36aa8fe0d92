"""Atomic writes: whole files under their name, private modes from the start, nothing left on failure."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from memel.atomic import write_json, write_text


def test_write_replaces_the_whole_file_and_creates_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "state.json"
    write_json(target, {"run_id": "x", "n": 3, "path": tmp_path})
    assert json.loads(target.read_text()) == {"n": 3, "path": str(tmp_path), "run_id": "x"}
    write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["state.json"], "no temporary file is left"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_private_mode_and_failure_leave_nothing_behind(tmp_path: Path) -> None:
    secret = tmp_path / "credentials"
    write_text(secret, "key", mode=0o600)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    with pytest.raises(TypeError):
        write_text(secret, 42)  # type: ignore[arg-type]  # fails while writing the temporary file
    assert secret.read_text() == "key", "a failed write keeps the old file"
    assert [p.name for p in tmp_path.iterdir()] == ["credentials"]
