"""A tracker that only logs to the ``memel.tracking`` logger (no server, no files)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from .base import RunStatus, flatten, is_secret_key

log = logging.getLogger("memel.tracking")


class ConsoleTracker:
    """Peer of :class:`MlflowTracker` for runs without tracking: everything goes to logging."""

    def __init__(self, run_name: str | None = None) -> None:
        self.run_name = run_name or "run"
        self.run_id: str | None = None

    def start(self) -> str:
        if self.run_id is None:
            self.run_id = uuid.uuid4().hex
            log.info("run %s (%s) started", self.run_name, self.run_id)
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        for key, value in flatten(params).items():
            if not is_secret_key(key):
                log.info("param %s = %s", key, value)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        log.info("step %d: %s", step, "  ".join(f"{k}={float(v):.6g}" for k, v in metrics.items()))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        log.info("tags %s", {k: str(v) for k, v in tags.items()})

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        log.info("artifact %s: %s", artifact_file, json.dumps(obj, default=str)[:2000])

    def log_text(self, text: str, artifact_file: str) -> None:
        log.info("artifact %s: %d characters", artifact_file, len(text))

    def log_artifact(self, path: str) -> None:
        log.info("artifact %s", path)

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def end(self, status: RunStatus = "FINISHED") -> None:
        log.info("run %s ended: %s", self.run_name, status)
