"""One native-kernel build at a time, and no wait on a build lock its dead holder left behind.

``torch.utils.cpp_extension.load`` guards a build folder with a ``lock`` file that it creates
on entry and removes on exit; a process killed in between (a killed build, a killed import)
leaves the file, and every later load waits on it forever. Here a load first takes an
``fcntl`` lock on ``memel-build.flock`` in the same folder: the kernel releases it when its
holder dies, so a second memel process waits for a live build and never for a dead one.
Holding it, a torch ``lock`` file is stale when no live process has it open (torch keeps it
open while it builds), works in the build folder or names it on its command line, and it is
older than :data:`STALE_AFTER_S`; a stale file is removed with a warning, a live one waited for.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

TORCH_LOCK = "lock"
MEMEL_LOCK = "memel-build.flock"
#: A torch lock file younger than this is never broken (its holder may not be visible yet).
STALE_AFTER_S = 10.0
POLL_S = 0.5


def build_directory(name: str, source: Path) -> Path:
    """The folder extension ``name`` is built in: one per source file location, under torch's cache.

    torch's cache (``$TORCH_EXTENSIONS_DIR``) keys a build by name alone and its build file records
    the source's path, so two installs of memel (two checkouts, two environments) sharing a cache
    would rebuild each other's kernel on every load. The folder's suffix, a hash of the source's
    resolved path, gives each install its own build.
    """
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False)).with_name(folder_name(name, source))


def folder_name(name: str, source: Path) -> str:
    """``name`` and a hash of ``source``'s resolved path: the build folder's name."""
    return f"{name}-{hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def exclusive_build(folder: Path) -> Iterator[None]:
    """Hold the build folder's memel lock (waiting for a live holder), with no stale torch lock left."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / MEMEL_LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            warnings.warn(
                f"memel: waiting for another process's build of the native kernel in {folder}",
                RuntimeWarning,
                stacklevel=3,
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            wait_for_torch_lock(folder)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def wait_for_torch_lock(folder: Path) -> None:
    """Return once ``folder`` has no torch lock file: wait while a live process holds it, remove it
    (with a warning) once it is stale."""
    lock = folder / TORCH_LOCK
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age >= STALE_AFTER_S and not live_users(folder):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            warnings.warn(
                f"memel: removed a stale build lock {lock} ({age:.0f} s old, no live process building there)",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        time.sleep(POLL_S)


def live_users(folder: Path) -> list[int]:
    """Process ids (other than this one) that have ``folder``'s torch lock open, work in ``folder``
    or name it on their command line (a compiler, ninja); only processes this user may inspect."""
    folder = folder.resolve()
    lock, found = str(folder / TORCH_LOCK), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        if _uses(entry, folder, lock):
            found.append(int(entry.name))
    return found


def _uses(process: Path, folder: Path, lock: str) -> bool:
    try:
        if str(folder) in (process / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
            return True
        cwd = Path(os.readlink(process / "cwd"))
        if cwd == folder or folder in cwd.parents:
            return True
        descriptors = list((process / "fd").iterdir())
    except OSError:  # gone, or another user's process
        return False
    return any(_target(fd) == lock for fd in descriptors)


def _target(link: Path) -> str | None:
    try:
        return os.readlink(link)
    except OSError:  # closed meanwhile
        return None
