"""Training runs launched concurrently on Ray: one lightweight driver task per run.

Each run's driver (``run_training``: MLflow run, Ray Train controller, summary) is a Ray task
that takes no CPU itself and is pinned to this node, so the job's output dir (run ids,
summaries) stays on one disk; its Train workers go wherever the cluster has room. Ray Train
reserves each run's workers as one placement group, so runs start as resources free up and
never deadlock on partial reservations. Runs are launched only while the CPUs and GPUs their
workers need fit in what the cluster has (Ray Train gives up on a worker group that waits too
long for resources); on an autoscaling cluster, cap concurrency with ``max_concurrent``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from memel.redaction import redact
from memel.training import TrainResult, TrainSpec
from memel.training.trial import TrialConfig

#: How often (seconds) the driver looks up from waiting on its runs to check for Ctrl-C.
WAIT_POLL_S = 0.5

_interrupted = threading.Event()


@contextlib.contextmanager
def noting_interrupts() -> Iterator[None]:
    """Ctrl-C (SIGINT) while the driver runs its members: noted before ``KeyboardInterrupt`` is raised,
    so :meth:`Launcher.wait_one` raises it again should code in between swallow it (Python only prints
    an exception raised in a finalizer; a library may catch ``BaseException``). The previous handler
    is restored on exit. Outside the main thread (where no handler can be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum: int, frame: Any) -> None:
        _interrupted.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, note)
    _interrupted.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupted.clear()


def _run_member(spec_tree: dict[str, Any], trial: TrialConfig | None) -> TrainResult:
    from memel.training import TrainSpec, run_training

    return run_training(TrainSpec(**spec_tree), trial=trial)


@dataclass
class Finished:
    """A launched run that ended: its result, or the error it raised."""

    key: str
    result: TrainResult | None
    error: str | None


def demand(spec: TrainSpec) -> dict[str, float]:
    """The cluster resources a run's workers hold while it trains."""
    workers = float(spec.train.workers)
    return {"CPU": workers, "GPU": workers if spec.train.use_gpu else 0.0}


class Launcher:
    """Keeps training runs in flight as far as the cluster's resources (and ``max_concurrent``) allow."""

    def __init__(self, max_concurrent: int | None = None) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._remote = ray.remote(num_cpus=0, max_retries=0)(_run_member).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        )
        self.max_concurrent = max_concurrent
        self._running: dict[Any, tuple[str, dict[str, float]]] = {}

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def has_room(self, spec: TrainSpec) -> bool:
        """Whether ``spec`` can start now: under ``max_concurrent`` and within the cluster's total."""
        import ray

        if self.max_concurrent is not None and len(self._running) >= self.max_concurrent:
            return False
        if not self._running:
            return True  # the first run always goes (Ray Train reports a run that can never fit)
        total = ray.cluster_resources()
        wanted = demand(spec)
        for resource, amount in wanted.items():
            held = sum(need.get(resource, 0.0) for _, need in self._running.values())
            if amount and held + amount > total.get(resource, 0.0):
                return False
        return True

    def launch(self, key: str, spec: TrainSpec, trial: TrialConfig | None = None) -> None:
        reference = self._remote.remote(spec.model_dump(mode="json"), trial)
        self._running[reference] = (key, demand(spec))

    def stop_all(self) -> None:
        """Stop every run in flight now (force-cancelling a member's task ends the Ray Train run it
        owns, workers included): on Ctrl-C nothing trains on while the driver winds down."""
        import ray

        for reference in list(self._running):
            try:
                ray.cancel(reference, force=True)
            except Exception:  # noqa: BLE001 - best effort while stopping; the task may have ended
                pass
        self._running.clear()

    def wait_one(self) -> Finished:
        """Block until one run ends; raise ``KeyboardInterrupt`` if Ctrl-C was noted meanwhile
        (:func:`noting_interrupts`), even where the first one was swallowed."""
        import ray

        done: list[Any] = []
        while not done:
            if _interrupted.is_set():
                raise KeyboardInterrupt
            done, _ = ray.wait(list(self._running), num_returns=1, timeout=WAIT_POLL_S)
        reference = done[0]
        key, _ = self._running.pop(reference)
        try:
            return Finished(key, ray.get(reference), None)
        except Exception as error:  # noqa: BLE001 - one failed run must not stop the others
            cause = getattr(error, "cause", None) or error
            return Finished(key, None, redact(f"{type(cause).__name__}: {cause}"))

    def run_all(
        self,
        items: Iterable[tuple[str, TrainSpec]],
        on_finished: Callable[[Finished], None],
        on_launch: Callable[[str], None] | None = None,
    ) -> None:
        """Launch every item as room allows; call ``on_finished`` as each ends."""
        pending = list(items)
        while pending or self._running:
            while pending and self.has_room(pending[0][1]):
                key, spec = pending.pop(0)
                self.launch(key, spec)
                if on_launch is not None:
                    on_launch(key)
            on_finished(self.wait_one())
