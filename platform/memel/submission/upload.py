"""Which files of the project stay behind when ``memel submit`` uploads it.

In a git checkout, a file git does not track (and does not ignore) stays behind, because an
untracked file is often a local secret (``.env``, a key, a credentials file); git-ignored files
stay behind too (Ray honours ``.gitignore``). Outside a git checkout, files matching
``DENY_LIST`` stay behind. The job file itself always goes, and ``--include PATH`` (a file,
a folder or a glob, relative to the project root) adds anything on purpose.
"""

from __future__ import annotations

import fnmatch
import subprocess
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

#: Names never uploaded outside a git checkout (a trailing "/" marks a folder).
DENY_LIST = (".env*", "*.pem", "id_*", "*credentials*", ".aws/", ".ssh/")

#: Folders never walked when the project is not a git checkout.
SKIPPED_FOLDERS = (".git", "__pycache__", ".venv", "venv", "runs", "mlruns", "node_modules")


def _git_files(root: Path, *args: str) -> list[str] | None:
    try:
        found = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", *args], capture_output=True, check=False, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if found.returncode != 0:
        return None
    return [name for name in found.stdout.decode(errors="surrogateescape").split("\0") if name]


def denied(path: str) -> bool:
    """Whether ``path`` (relative, POSIX) matches ``DENY_LIST``."""
    parts = PurePosixPath(path).parts
    for pattern in DENY_LIST:
        if pattern.endswith("/"):
            if pattern[:-1] in parts[:-1]:
                return True
        elif fnmatch.fnmatch(parts[-1], pattern):
            return True
    return False


def _walk(root: Path) -> list[str]:
    files = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if any(part in SKIPPED_FOLDERS for part in relative.parts[:-1]) or not path.is_file():
            continue
        files.append(relative.as_posix())
    return files


def _included(path: str, includes: Iterable[str]) -> bool:
    for pattern in includes:
        pattern = pattern.strip("/")
        if path == pattern or path.startswith(pattern + "/") or fnmatch.fnmatch(path, pattern):
            return True
    return False


def left_out(root: Path, keep: Iterable[str] = (), includes: Iterable[str] = ()) -> tuple[list[str], str]:
    """(files of ``root`` that stay behind, relative and sorted; why): untracked files in a git
    checkout, else files on the deny-list; never ``keep`` (the job file) or an ``includes`` match."""
    includes = [*includes, *keep]
    untracked = _git_files(root, "--others", "--exclude-standard")
    if untracked is not None:
        candidates, reason = untracked, "not tracked by git"
    else:
        candidates, reason = [path for path in _walk(root) if denied(path)], f"on the deny-list {', '.join(DENY_LIST)}"
    return sorted(path for path in candidates if not _included(path, includes)), reason


def as_excludes(paths: Iterable[str]) -> list[str]:
    """Ray ``excludes`` patterns matching exactly these files (anchored, glob characters escaped)."""
    escaped = []
    for path in paths:
        for char in "\\[]*?!#":
            path = path.replace(char, "\\" + char)
        escaped.append("/" + path)
    return escaped
