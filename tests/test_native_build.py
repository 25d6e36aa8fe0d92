"""The native kernel's build lock: a lock left by a killed build is broken, a live build waited for.

Each test loads the kernel in a fresh interpreter with its own ``TORCH_EXTENSIONS_DIR`` (the first
load builds it, about a minute), so the shared cache is never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memel.inhibition.native import EXTENSION_NAME, SOURCE
from memel.inhibition.native_build import MEMEL_LOCK, STALE_AFTER_S, TORCH_LOCK, build_directory, folder_name

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
LOAD = "from memel.inhibition import native; print('loaded', native.load() is not None, flush=True)"
BUILD_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def extensions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("torch_extensions")


def _env(extensions: Path) -> dict[str, str]:
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "PYTHONPATH": str(PLATFORM)}


def _load(extensions: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", LOAD], env=_env(extensions), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _old(path: Path) -> None:
    past = time.time() - 10 * STALE_AFTER_S
    os.utime(path, (past, past))


def test_a_lock_left_by_a_killed_build_is_broken(extensions: Path) -> None:
    folder = extensions / folder_name(EXTENSION_NAME, SOURCE)
    folder.mkdir(parents=True)
    (folder / TORCH_LOCK).write_text("")
    _old(folder / TORCH_LOCK)
    loader = _load(extensions)
    try:
        out, err = loader.communicate(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        loader.kill()
        pytest.fail("the load waited on the stale lock")
    assert loader.returncode == 0, err[-3000:]
    assert "loaded True" in out, err[-3000:]
    assert "removed a stale build lock" in err
    assert not (folder / TORCH_LOCK).exists()


HOLD_TORCH_LOCK = """
import os, sys, time
lock, release = os.environ["HOLD_LOCK"], os.environ["HOLD_RELEASE"]
fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # as torch's FileBaton does while it builds
past = time.time() - 3600
os.utime(lock, (past, past))
print("holding", flush=True)
while not os.path.exists(release):
    time.sleep(0.1)
os.close(fd)
os.remove(lock)
"""

HOLD_MEMEL_LOCK = """
import fcntl, os, sys, time
lock, release = os.environ["HOLD_LOCK"], os.environ["HOLD_RELEASE"]
handle = open(lock, "a")
fcntl.flock(handle, fcntl.LOCK_EX)  # as another memel process does while it builds
print("holding", flush=True)
while not os.path.exists(release):
    time.sleep(0.1)
"""


@pytest.fixture(params=["torch", "memel"])
def live_holder(request: pytest.FixtureRequest, extensions: Path, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A live process holding the build folder's torch lock (an old, open file) or memel lock."""
    folder = extensions / folder_name(EXTENSION_NAME, SOURCE)
    folder.mkdir(parents=True, exist_ok=True)
    script, lock = (
        (HOLD_TORCH_LOCK, folder / TORCH_LOCK) if request.param == "torch" else (HOLD_MEMEL_LOCK, folder / MEMEL_LOCK)
    )
    release = tmp_path / "release"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={**os.environ, "HOLD_LOCK": str(lock), "HOLD_RELEASE": str(release)},  # not on its command line
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    try:
        yield lock, release
    finally:
        release.write_text("")
        holder.wait(timeout=30)


def test_a_live_build_is_waited_for(live_holder: tuple[Path, Path], extensions: Path) -> None:
    lock, release = live_holder
    loader = _load(extensions)
    try:
        time.sleep(4 * 0.5 + 3)  # several of the loader's polls
        assert loader.poll() is None, "the load did not wait for the live holder"
        assert lock.exists(), "a live holder's lock was removed"
        release.write_text("")
        out, err = loader.communicate(timeout=BUILD_TIMEOUT_S)
    finally:
        if loader.poll() is None:
            loader.kill()
    assert loader.returncode == 0 and "loaded True" in out, err[-3000:]
    assert "removed a stale build lock" not in err


def test_each_source_location_builds_in_its_own_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two installs sharing torch's cache never rebuild each other's kernel; one install keeps one folder."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here, copy = SOURCE, tmp_path / "elsewhere" / SOURCE.name
    assert build_directory(EXTENSION_NAME, here) == build_directory(EXTENSION_NAME, here)
    assert build_directory(EXTENSION_NAME, here) != build_directory(EXTENSION_NAME, copy)
    assert build_directory(EXTENSION_NAME, here).parent == tmp_path
    assert build_directory(EXTENSION_NAME, here).name.startswith(f"{EXTENSION_NAME}-")
