"""The embedded Ray's token file: created private, tightened when loose, left alone where Ray does not read it.

The real check (the embedded Ray started with an empty HOME uses a 0600 token and its dashboard refuses
a request without it) is in tests/test_secrets_and_binding.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memel.training.ray_token import ensure_private_token


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_missing_token_is_created_for_this_user_only(tmp_path: Path) -> None:
    path = ensure_private_token({}, tmp_path)
    assert path == tmp_path / ".ray" / "auth_token"
    assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert ensure_private_token({"RAY_AUTH_MODE": "token"}, tmp_path) == path and path.read_text() == token, "kept"
    other = ensure_private_token({}, tmp_path / "other")
    assert other is not None and other.read_text() != token


def test_a_token_readable_by_others_is_tightened_and_kept(tmp_path: Path) -> None:
    path = tmp_path / ".ray" / "auth_token"
    path.parent.mkdir()
    path.write_text("operators-own-token")
    path.chmod(0o644)
    assert ensure_private_token({}, tmp_path) == path
    assert _mode(path) == 0o600 and path.read_text() == "operators-own-token"


@pytest.mark.parametrize(
    "environ",
    [
        {"RAY_AUTH_MODE": "disabled"},
        {"RAY_AUTH_TOKEN": "from-the-environment"},
        {"RAY_AUTH_TOKEN_PATH": "/somewhere/else"},
    ],
)
def test_nothing_is_written_where_ray_does_not_read_the_default_file(tmp_path: Path, environ: dict) -> None:
    assert ensure_private_token(environ, tmp_path) is None
    assert not (tmp_path / ".ray").exists()


@pytest.mark.skipif(os.getuid() != 0, reason="giving a file to another user needs root")
def test_another_users_file_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / ".ray" / "auth_token"
    path.parent.mkdir()
    path.write_text("someone-elses")
    path.chmod(0o644)
    os.chown(path, 65534, 65534)  # nobody
    assert ensure_private_token({}, tmp_path) == path
    assert _mode(path) == 0o644 and path.read_text() == "someone-elses"
