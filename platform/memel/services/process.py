"""Detached server processes and their PID records.

A record keeps the PID with the process's start time (``/proc/PID/stat`` field 22, or psutil's
create time where there is no ``/proc``) and the boot id. A PID only counts as ours while both
still match, so a PID the kernel has since handed to an unrelated process is never signalled.
Each server is the leader of its own session and process group, so stopping it signals the
whole group (MLflow's uvicorn workers included).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from memel.atomic import write_text

State = Literal["running", "stopped", "stale"]
StopOutcome = Literal["stopped", "killed", "stale"]


@dataclass(frozen=True)
class ProcessRecord:
    """What ``up`` wrote about one server it started."""

    service: str
    pid: int
    start_time: str
    boot_id: str
    argv: list[str]
    url: str
    log: str
    started_at: str

    def save(self, path: Path) -> None:
        """Write the record atomically (readers never see half a file)."""
        write_text(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> ProcessRecord | None:
        """The record in ``path``; None when there is none or it is unreadable."""
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def boot_id() -> str:
    """This boot's id (empty where the kernel does not say)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` fields after the command name (index 0 is the state); None if absent."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def start_time(pid: int) -> str | None:
    """When ``pid`` started (an opaque token); None when no such live process exists."""
    if Path("/proc/self/stat").exists():
        fields = _proc_stat(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return None
        return fields[19]
    try:
        import psutil
    except ImportError:
        return None
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else f"{process.create_time():.3f}"
    except psutil.Error:
        return None


def is_ours(record: ProcessRecord) -> bool:
    """The recorded PID is still the process ``up`` started (same start time, same boot)."""
    current = start_time(record.pid)
    return current is not None and current == record.start_time and record.boot_id == boot_id()


def state_of(record: ProcessRecord | None) -> State:
    """``running`` (ours and alive), ``stale`` (a record whose process is gone or replaced), or ``stopped``."""
    if record is None:
        return "stopped"
    return "running" if is_ours(record) else "stale"


def start_detached(
    service: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path, url: str
) -> tuple[subprocess.Popen, ProcessRecord]:
    """Start ``argv`` in its own session with output appended to ``log``; it outlives this process."""
    log.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    with open(log, "ab") as out:
        out.write(f"\n=== memel services: {service} starting at {stamp}: {' '.join(argv)}\n".encode())
        out.flush()
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=dict(env),
            start_new_session=True,
            close_fds=True,
        )
    token = start_time(process.pid)
    if token is None:  # exited at once: record nothing, the caller reads the log
        process.wait()
        token = ""
    record = ProcessRecord(service, process.pid, token, boot_id(), list(argv), url, str(log), stamp)
    return process, record


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our child (a zombie otherwise counts as alive)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None and fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def _wait_gone(pgid: int, until: float) -> bool:
    while True:
        _reap(pgid)
        if not group_members(pgid):
            return True
        if time.monotonic() >= until:
            return False
        time.sleep(0.1)


def stop(record: ProcessRecord, timeout_s: float = 30.0) -> StopOutcome:
    """SIGTERM the record's process group, SIGKILL it after ``timeout_s``; never signal a PID
    that is not the recorded process (returns ``stale`` without sending anything)."""
    if not is_ours(record):
        return "stale"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(record.pid, signal.SIGTERM)
    if _wait_gone(record.pid, time.monotonic() + timeout_s):
        return "stopped"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(record.pid, signal.SIGKILL)
    _wait_gone(record.pid, time.monotonic() + 10.0)
    return "killed"
