"""Local infrastructure for users without any: ``memel services up|down|status``.

Starts an MLflow tracking server, a SeaweedFS S3-protocol store and optuna-dashboard on this
machine as detached processes, with PID records, logs, SQLite stores, data and generated
credentials in one state directory (default ``~/.memel/services``).
"""

from memel.services.config import (
    SERVICES,
    ServicesConfig,
    StatePaths,
    parse_only,
    resolve_state_dir,
)
from memel.services.health import ServiceError
from memel.services.manager import DownResult, ServiceStatus, UpResult, down, status, up

__all__ = [
    "SERVICES",
    "DownResult",
    "ServiceError",
    "ServiceStatus",
    "ServicesConfig",
    "StatePaths",
    "UpResult",
    "down",
    "parse_only",
    "resolve_state_dir",
    "status",
    "up",
]
