"""Ending a process that ran gloo collectives, without the interpreter's shutdown."""

from __future__ import annotations

import os
import sys
from typing import NoReturn


def exit_after_collectives(code: int = 0) -> NoReturn:
    """Flush stdout and stderr, then end the process at once with ``code``.

    gloo's worker thread may still be releasing the last collective's work when the main thread
    is done, and that work holds tensors that are Python objects. If the interpreter is shutting
    down by then, the thread cannot take the GIL, is ended, and the C++ runtime aborts the process
    ("terminate called without an active exception"): a rank whose work was done exits with
    SIGABRT. Skipping the shutdown avoids it; call this only once every file is written and closed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
