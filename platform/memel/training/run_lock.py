"""One invocation at a time per output folder: an exclusive ``flock`` on ``<folder>/.memel.lock``.

The lock file holds who has it (pid, host, start time), so a second ``memel run`` of the same
job can say who is running it and stop before it writes anything. The lock is the kernel's: it
goes away with the process, even one killed with SIGKILL, so a stale file never blocks a rerun.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from memel.errors import ConfigError

LOCK_FILE = ".memel.lock"


class RunLocked(ConfigError):
    """Another process holds the output folder's lock."""


@contextlib.contextmanager
def hold_lock(folder: Path, field: str = "output_dir") -> Iterator[None]:
    """Hold ``folder``'s lock for the block; raises RunLocked (naming the holder) when taken.

    A block refused with a ConfigError leaves nothing behind: the folders made for the lock are
    removed again when they hold nothing but the lock file."""
    path = folder / LOCK_FILE
    created = next((f for f in [*reversed(folder.parents), folder] if not f.exists()), None)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 - held open for the block
    except OSError as error:
        raise ConfigError(
            f"{field}: cannot write to {folder} ({error.strerror or error}); choose a writable folder"
        ) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunLocked(
                f"{field}: {folder} is in use by {_describe(holder)}; wait for it to end (or stop it), "
                f"or choose another {field}"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            )
        )
        handle.flush()
        try:
            yield
        except ConfigError:
            if created is not None and _holds_only_the_lock(created):
                shutil.rmtree(created, ignore_errors=True)
            raise
    finally:
        handle.close()  # releases the lock


def _holds_only_the_lock(folder: Path) -> bool:
    return all(p.is_dir() or p.name == LOCK_FILE for p in folder.rglob("*"))


def _describe(holder: str) -> str:
    try:
        found = json.loads(holder)
        return f"memel (pid {found['pid']} on {found['host']}, since {found['started']})"
    except (ValueError, KeyError, TypeError):
        return holder
