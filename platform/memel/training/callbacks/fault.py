"""Test hook: a real crash for fault-tolerance tests. With ``MEMEL_FAULT_KILL_AT_STEP`` and
``MEMEL_FAULT_MARKER`` set, the last rank SIGKILLs itself once at that step (the marker file,
written first, keeps a resumed run from dying again)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from .base import Callback

FAULT_STEP_ENV = "MEMEL_FAULT_KILL_AT_STEP"
FAULT_MARKER_ENV = "MEMEL_FAULT_MARKER"


class FaultInjector(Callback):
    """Kills this process after step ``MEMEL_FAULT_KILL_AT_STEP`` when it is the last rank."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def post_step(self, step: int) -> None:
        at, marker = os.environ.get(FAULT_STEP_ENV), os.environ.get(FAULT_MARKER_ENV)
        if at is None or marker is None or step != int(at) or self.rank != self.world - 1 or Path(marker).exists():
            return
        Path(marker).write_text(f"killed rank {self.rank} at step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)
