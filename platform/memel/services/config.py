"""What ``memel services`` runs and where it keeps its state.

:class:`ServicesConfig` holds the command-line choices; :class:`StatePaths` names every file
in the state directory (PID records, logs, SQLite stores, SeaweedFS data, credentials).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from memel.errors import ConfigError

SERVICES: tuple[str, ...] = ("s3", "mlflow", "dashboard")
"""Every service, in start order (MLflow's artifacts go to the S3 store)."""
STATE_DIR_ENV = "MEMEL_SERVICES_DIR"
DEFAULT_STATE_DIR = Path("~/.memel/services")
DEFAULT_PORTS: dict[str, int] = {"mlflow": 5000, "s3": 8333, "dashboard": 8080}
PORT_OPTIONS: dict[str, str] = {"mlflow": "--mlflow-port", "s3": "--s3-port", "dashboard": "--dashboard-port"}
DEFAULT_BUCKET = "mlflow-artifacts"
REGION = "us-east-1"
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def resolve_state_dir(option: Path | None) -> Path:
    """``--state-dir``, else ``$MEMEL_SERVICES_DIR``, else ``~/.memel/services`` (absolute)."""
    chosen = option or (Path(os.environ[STATE_DIR_ENV]) if os.environ.get(STATE_DIR_ENV) else DEFAULT_STATE_DIR)
    return chosen.expanduser().resolve()


def parse_only(value: str | None) -> tuple[str, ...]:
    """``--only mlflow,s3`` as service names in start order; ``None`` means all of them."""
    if not value:
        return SERVICES
    names = {part.strip() for part in value.split(",") if part.strip()}
    unknown = sorted(names - set(SERVICES))
    if unknown or not names:
        raise ConfigError(f"--only: got {value!r}; allowed: a comma-separated subset of {', '.join(SERVICES)}")
    return tuple(name for name in SERVICES if name in names)


def client_host(host: str) -> str:
    """The address a client on this machine dials for a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def http_url(host: str, port: int) -> str:
    """``http://HOST:PORT`` for a client on this machine (IPv6 literals bracketed)."""
    shown = client_host(host)
    try:
        if ipaddress.ip_address(shown).version == 6:
            shown = f"[{shown}]"
    except ValueError:
        pass  # a host name
    return f"http://{shown}:{port}"


@dataclass(frozen=True)
class StatePaths:
    """Every file ``memel services`` keeps under its state directory."""

    root: Path

    def pid_file(self, service: str) -> Path:
        return self.root / f"{service}.pid.json"

    def log_file(self, service: str) -> Path:
        return self.root / "logs" / f"{service}.log"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        """Where MLflow artifacts go without the S3 store (``--no-s3``)."""
        return self.root / "mlflow-artifacts"

    @property
    def optuna_db(self) -> Path:
        return self.root / "optuna.db"

    @property
    def dashboard_config(self) -> Path:
        """optuna-dashboard's settings (the storage URL, which may hold a password: mode 0600)."""
        return self.root / "dashboard.toml"

    @property
    def s3_data(self) -> Path:
        return self.root / "s3-data"

    @property
    def s3_identities(self) -> Path:
        """SeaweedFS S3 identities (holds the secret key: mode 0600)."""
        return self.root / "s3-identities.json"

    @property
    def s3_ports(self) -> Path:
        """SeaweedFS's internal ports (master, volume, filer, gRPC), kept from one start to the next."""
        return self.root / "s3-internal-ports.json"

    @property
    def credentials(self) -> Path:
        """Generated S3 credentials (mode 0600)."""
        return self.root / "credentials.json"

    @property
    def env_sh(self) -> Path:
        """``source`` it for the tracking URI, the S3 endpoint and keys (mode 0600)."""
        return self.root / "env.sh"

    def create(self) -> None:
        """Create the state directory (mode 0700) and its log folder."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root / "logs").mkdir(exist_ok=True, mode=0o700)


@dataclass(frozen=True)
class ServicesConfig:
    """The choices of one ``memel services up``."""

    state_dir: Path
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    only: tuple[str, ...] = SERVICES
    use_s3: bool = True
    artifacts_dir: Path | None = None
    bucket: str = DEFAULT_BUCKET
    optuna_storage: str | None = None
    start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.only) - set(SERVICES))
        if unknown:
            raise ConfigError(f"--only: got {', '.join(unknown)}; allowed: {', '.join(SERVICES)}")
        only = tuple(name for name in SERVICES if name in self.only and (self.use_s3 or name != "s3"))
        object.__setattr__(self, "only", only)
        for name, port in self.ports.items():
            if not 1 <= port <= 65535:
                raise ConfigError(f"{PORT_OPTIONS[name]}: got {port}; allowed: 1-65535")
        if not BUCKET_NAME.fullmatch(self.bucket):
            raise ConfigError(
                f"--bucket: got {self.bucket!r}; allowed: 3-63 lowercase letters, digits, dots and hyphens"
            )
        chosen = {name: self.ports[name] for name in only}
        if len(set(chosen.values())) != len(chosen):
            raise ConfigError(
                f"ports must differ: got {', '.join(f'{PORT_OPTIONS[n]} {p}' for n, p in chosen.items())}"
            )

    @property
    def paths(self) -> StatePaths:
        return StatePaths(self.state_dir)

    @property
    def artifacts_to_s3(self) -> bool:
        """MLflow artifacts go to the local S3 store (not ``--no-s3`` nor ``--artifacts-dir``)."""
        return self.use_s3 and self.artifacts_dir is None

    @property
    def dashboard_storage(self) -> str:
        """The Optuna storage optuna-dashboard opens."""
        return self.optuna_storage or f"sqlite:///{self.paths.optuna_db}"

    def url(self, service: str) -> str:
        return http_url(self.host, self.ports[service])
