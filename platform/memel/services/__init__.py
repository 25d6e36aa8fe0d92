"""Local infrastructure for users without any: ``memel services up|down|status``.

Starts an MLflow tracking server, a SeaweedFS S3-protocol store and optuna-dashboard on this
machine as detached processes, with PID records, logs, SQLite stores, data and generated
credentials in one state directory (default ``~/.memel/services``).

Names load their module on first access (the command line's help needs only ``config``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memel.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("SERVICES", "ServicesConfig", "StatePaths", "parse_only", "resolve_state_dir"), ".config"),
    "ServiceError": ".health",
    **dict.fromkeys(("DownResult", "ServiceStatus", "UpResult", "down", "status", "up"), ".manager"),
}
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
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .config import SERVICES, ServicesConfig, StatePaths, parse_only, resolve_state_dir
    from .health import ServiceError
    from .manager import DownResult, ServiceStatus, UpResult, down, status, up
