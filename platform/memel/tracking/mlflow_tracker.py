"""MLflow tracking through an explicit ``MlflowClient`` (no global MLflow state), so several
trackers can live in one process.

Metrics never crash or stall training: :meth:`MlflowTracker.log_metrics` only appends to
an in-memory buffer, and a background thread sends it with ``MlflowClient.log_batch``
(at most 1,000 metrics a request). When the server cannot be reached the batch stays
buffered, a warning is logged (on the first failure, then every 10th), and it is re-sent
with exponential backoff (0.5 s doubling to 30 s) until it succeeds; a batch the server
rejects as invalid (HTTP 4xx other than 429) is dropped with a warning instead. The
buffer holds at most ``max_buffered_metrics`` values (the oldest are dropped beyond that,
with a warning). ``flush(timeout)`` waits for delivery and ``end()`` flushes before it
marks the run terminated. How long one attempt may take is MLflow's own retry policy
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``), spent in the
background thread. Params, tags and artifacts are sent synchronously (a few calls per run).

A resumed run never gets a metric twice: :meth:`MlflowTracker.start` reads the last step the
run holds for every key, and values logged later at that step or an earlier one (a resumed
run replaying steps after its last checkpoint) are not sent again. A run that was FINISHED
stays FINISHED: ending a rerun of it as FAILED or KILLED keeps FINISHED (with a warning).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from memel.errors import ConfigError
from memel.redaction import redact, redact_tree

from .base import RunStatus, flatten, is_secret_key

log = logging.getLogger("memel.tracking")

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
MAX_KEY = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH


def default_tracking_uri(output_dir: str | os.PathLike[str]) -> str:
    """A local store inside ``output_dir`` that needs no server: ``sqlite:///<dir>/mlflow.db``
    (MLflow 3's default backend; its file store is deprecated). Artifacts of experiments
    created by :class:`MlflowTracker` go to ``<dir>/mlartifacts``."""
    return f"sqlite:///{Path(output_dir).expanduser().resolve() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


def _local_dir(uri: str) -> Path | None:
    """The local folder a local tracking store lives in (None for a server)."""
    db = _sqlite_path(uri)
    if db is not None:
        return db.parent
    if uri.startswith("file://"):
        return Path(urlsplit(uri).path)
    if "://" not in uri and not uri.startswith(("databricks", "sqlite:")):
        return Path(uri).expanduser()
    return None


def check_tracking_uri(uri: str, field: str = "tracking.uri", timeout: float = 3.0) -> None:
    """Preflight before any worker starts: an http(s) server answers ``GET /health`` within
    ``timeout`` seconds, or a local store's folder is writable. Raises ConfigError naming ``field``."""
    if not isinstance(uri, str) or not uri:
        raise ConfigError(
            f"{field}: got {uri!r}; allowed: http(s)://host:port, sqlite:///path/mlflow.db or a local folder"
        )
    shown = redact(uri)
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        except requests.RequestException as error:
            raise ConfigError(
                f"{field}: the MLflow server {shown} is unreachable ({type(error).__name__}); start it "
                "(mlflow server ...) or leave tracking.uri empty for a local store in the output folder"
            ) from None
        if response.status_code != 200:
            raise ConfigError(
                f"{field}: {shown}/health answered HTTP {response.status_code}; is this an MLflow server?"
            )
        return
    folder = _local_dir(uri)
    if folder is None:
        raise ConfigError(
            f"{field}: got {shown!r}; allowed: http(s)://host:port, sqlite:///path/mlflow.db or a local folder"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".memel-preflight-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"{field}: got {shown!r}; the folder {folder} is not writable ({error.strerror or error}); "
            "choose a writable output folder or an MLflow server"
        ) from None


@contextlib.contextmanager
def _redacted_stdout():
    """What MLflow writes to stdout meanwhile, passed on with URI credentials redacted."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        if captured.getvalue():
            sys.stdout.write(redact(captured.getvalue()))
            sys.stdout.flush()


def _permanent(error: Exception) -> bool:
    """An error retrying cannot fix: the server rejected the request (4xx other than 429)."""
    status = getattr(error, "get_http_status_code", lambda: None)()
    return isinstance(status, int) and 400 <= status < 500 and status != 429


class MlflowTracker:
    """One MLflow run: created on :meth:`start` (or resumed by ``run_id``), child of
    ``parent_run_id`` when given. See the module doc for how metrics are delivered."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_id: str | None = None,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        artifact_location: str | None = None,
        max_buffered_metrics: int = 1_000_000,
    ) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_id = run_id
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        db = _sqlite_path(tracking_uri)
        if artifact_location is None and db is not None:
            artifact_location = (db.parent / "mlartifacts").as_uri()
        self.artifact_location = artifact_location
        self.max_buffered_metrics = max_buffered_metrics
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._started = False
        self._metrics: deque[Any] = deque()
        self._inflight = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._delivered: dict[str, int] = {}  # key -> the last step the run already holds
        self._was_finished = False

    # ------------------------------------------------------------------ run
    def start(self) -> str:
        """Create the run (once) or resume ``run_id``; returns the run id."""
        if self._started and self.run_id:
            return self.run_id
        db = _sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        if self.run_id:
            run = self.client.get_run(self.run_id)
            self._was_finished = run.info.status == "FINISHED"
            self._delivered = {
                m.key: m.step for m in getattr(run.data, "_metric_objs", [])
            }  # the latest = highest step
            if run.info.status != "RUNNING":
                self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}
            run = self.client.create_run(self._experiment_id(), run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
        self._started = True
        return self.run_id

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment, artifact_location=self.artifact_location)
        except MlflowException:  # created concurrently by another worker
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def _run_id(self) -> str:
        if not self.run_id or not self._started:
            raise RuntimeError("MlflowTracker: call start() first")
        return self.run_id

    def end(self, status: RunStatus = "FINISHED", timeout: float | None = 60.0) -> None:
        """Deliver buffered metrics (up to ``timeout``) and mark the run ``status``."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status: got {status!r}; allowed: FINISHED, FAILED, KILLED")
        run_id = self._run_id()
        if not self.flush(timeout):
            log.warning(
                "MLflow run %s ends with %d metric values not delivered to %s",
                run_id,
                len(self._metrics),
                redact(self.tracking_uri),
            )
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._was_finished and status != "FINISHED":
            log.warning("MLflow run %s finished before; it stays FINISHED (this invocation ended %s)", run_id, status)
            status = "FINISHED"
        with _redacted_stdout():  # MLflow prints "View run ... at: <tracking URI>/#/..."
            self.client.set_terminated(run_id, status=status)
        self._started = False

    # ------------------------------------------------------------------ params, tags, artifacts
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Flattened dotted keys; values redacted and cut to MLflow's 6,000 characters; secret-looking keys dropped."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        run_id = self._run_id()
        items = [
            Param(k[:MAX_KEY], redact(v)[:MAX_PARAM_VALUE]) for k, v in flatten(params).items() if not is_secret_key(k)
        ]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            try:
                self.client.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH], synchronous=True)
            except MlflowException as error:
                if not _permanent(error):
                    raise
                # e.g. a resumed run whose params changed: MLflow params are immutable
                log.warning("MLflow refused params %s...: %s", [p.key for p in items[i : i + 3]], error.message[:500])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags (string values, redacted and cut to MLflow's limit); secret-looking keys dropped."""
        from mlflow.entities import RunTag

        run_id = self._run_id()
        items = [
            RunTag(str(k)[:MAX_KEY], redact(str(v))[:MAX_TAG_VALUE])
            for k, v in tags.items()
            if not is_secret_key(str(k))
        ]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=items[i : i + PARAMS_PER_BATCH], synchronous=True)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """``obj`` (with every URI credential redacted) as a JSON/YAML artifact."""
        self.client.log_dict(self._run_id(), redact_tree(obj), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """``text`` (with every URI credential redacted) as an artifact."""
        self.client.log_text(self._run_id(), redact(text), artifact_file)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self._run_id(), path, artifact_path)

    # ------------------------------------------------------------------ metrics
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Buffer scalar metrics at ``step``; a background thread delivers them (never raises
        for a server problem, never blocks on the network)."""
        from mlflow.entities import Metric

        self._run_id()
        now = int(time.time() * 1000)
        entries = [Metric(str(k)[:MAX_KEY], float(v), now, int(step)) for k, v in metrics.items()]
        entries = [m for m in entries if m.step > self._delivered.get(m.key, -1)]  # not sent again on replay
        dropped = 0
        with self._cond:
            self._metrics.extend(entries)
            while len(self._metrics) > self.max_buffered_metrics:
                self._metrics.popleft()
                dropped += 1
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._send_loop, name="memel-mlflow-metrics", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        if dropped:
            log.warning("MLflow metrics buffer full: dropped the %d oldest values", dropped)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every metric logged so far was delivered; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._metrics or self._inflight:
                if self._thread is None or not self._thread.is_alive():
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 1.0) if remaining is not None else 1.0)
            return True

    def _send_loop(self) -> None:
        delay, failures = 0.5, 0
        while True:
            with self._cond:
                while not self._metrics and not self._stop:
                    self._cond.wait()
                if not self._metrics:
                    return
                batch = [self._metrics.popleft() for _ in range(min(METRICS_PER_BATCH, len(self._metrics)))]
                self._inflight = len(batch)
            try:
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            except Exception as error:  # noqa: BLE001 - nothing here may reach the training loop
                if _permanent(error):
                    log.warning("MLflow rejected %d metric values; dropped: %s", len(batch), str(error)[:500])
                    batch = []
                else:
                    failures += 1
                    if failures == 1 or failures % 10 == 0:
                        log.warning(
                            "MLflow server %s unreachable (attempt %d; %d metric values buffered, retrying in %.1fs): %s",
                            redact(self.tracking_uri),
                            failures,
                            len(batch) + len(self._metrics),
                            delay,
                            type(error).__name__,
                        )
                with self._cond:
                    self._metrics.extendleft(reversed(batch))
                    self._inflight = 0
                    self._cond.notify_all()
                    if batch:
                        self._cond.wait_for(lambda: self._stop, timeout=delay)
                        if self._stop:  # end() gave up waiting: what is left is lost (it warned)
                            return
                if batch:
                    delay = min(delay * 2, 30.0)
                continue
            if failures:
                log.warning(
                    "MLflow server %s reachable again after %d failed attempts", redact(self.tracking_uri), failures
                )
            delay, failures = 0.5, 0
            with self._cond:
                self._inflight = 0
                self._cond.notify_all()
