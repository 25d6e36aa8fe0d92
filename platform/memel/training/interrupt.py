"""What a run does when it stops early: the MLflow status it ends with, the cause it shows, and how to resume.

A run stopped with Ctrl-C (SIGINT) ends KILLED, not FAILED; a run that fails because its
output folder broke (disk full, permissions) shows that cause first, not the error MLflow
raises afterwards while trying to record the failure in the same folder.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from typing import Any

#: The exit status of a command stopped by SIGINT (128 + 2), as shells report it.
INTERRUPTED_EXIT = 130

#: How long Ctrl-C waits for Ray Train's controller to stop the workers before the driver goes on.
ABORT_TIMEOUT_S = 30.0


def interruptible(trainer_class: type) -> type:
    """``trainer_class`` (a Ray Train trainer) whose Ctrl-C in the driver stops the run as Ray's own
    handler does (the controller aborts the workers) and then raises ``KeyboardInterrupt``, so the
    command ends as every interrupted memel run does: MLflow status KILLED, the resume command,
    exit 130. Ray's handler swallows the signal (the command ended with status 1 and no word of
    why) and stays installed after ``fit``; here the handler that was there before comes back."""
    import ray

    class Interruptible(trainer_class):  # type: ignore[misc, valid-type]
        def _register_sigint_handler(self, controller: Any) -> None:
            def stop(signum: int, frame: Any) -> None:
                try:
                    ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
                except Exception:  # noqa: BLE001 - the controller may have ended already
                    pass
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, stop)

        def fit(self) -> Any:
            main = threading.current_thread() is threading.main_thread()
            previous = signal.getsignal(signal.SIGINT) if main else None
            try:
                return super().fit()
            finally:
                if previous is not None:
                    signal.signal(signal.SIGINT, previous)

    Interruptible.__name__ = Interruptible.__qualname__ = f"Interruptible{trainer_class.__name__}"
    return Interruptible


def status_after(error: BaseException) -> str:
    """The MLflow status a run ends with after ``error``: KILLED when stopped by the user, else FAILED."""
    return "KILLED" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "FAILED"


def end_after_error(tracker: Any, error: BaseException) -> bool:
    """Mark ``tracker``'s run KILLED or FAILED (True when done); when that fails too (the store is in
    the broken folder), say so on stderr and leave ``error`` as the one that propagates."""
    status = status_after(error)
    try:
        tracker.end(status, timeout=10.0)
        return True
    except Exception as end_error:  # noqa: BLE001 - the original error is what the user must see
        print(
            f"[memel] warning: could not mark MLflow run {tracker.run_id} {status} "
            f"({type(end_error).__name__}: {end_error}); it stays RUNNING",
            file=sys.stderr,
            flush=True,
        )
        return False


def root_cause(error: BaseException) -> BaseException:
    """The innermost error behind ``error`` (Ray's wrappers and ``raise ... from`` chains), preferring
    an OSError (a disk or permission problem) when one is in the chain."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen:
        seen.append(current)
        wrapped = getattr(current, "cause", None) or getattr(current, "controller_failure", None)  # Ray's wrappers
        if isinstance(wrapped, BaseException):
            current = wrapped
            continue
        worker_errors = getattr(current, "worker_failures", None) or getattr(current, "errors", None)
        if isinstance(worker_errors, dict) and worker_errors:
            current = next(iter(worker_errors.values()))
            continue
        current = current.__cause__ or current.__context__
    for found in seen:
        if isinstance(found, OSError):
            return found
    return seen[-1]


def describe(error: BaseException) -> str:
    """One line: the root cause's type and message (a diverged run's message alone: it says what happened)."""
    from memel.errors import NonFiniteLossError

    cause = root_cause(error)
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    if isinstance(cause, NonFiniteLossError):
        return text
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that runs this invocation again (which resumes it)."""
    args = list(sys.argv if argv is None else argv)
    return shlex.join(["memel", *args[1:]])


def mark_killed(tracking_uri: str, run_ids: list[str]) -> None:
    """Mark the runs that are still RUNNING as KILLED (runs of members stopped with the driver)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for run_id in run_ids:
        try:
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status="KILLED")
        except Exception as error:  # noqa: BLE001 - best effort while stopping
            print(
                f"[memel] warning: could not mark MLflow run {run_id} KILLED ({type(error).__name__})", file=sys.stderr
            )
