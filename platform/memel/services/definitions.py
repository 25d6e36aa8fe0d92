"""The three servers: how each is started (command, environment) and how it is probed.

- ``s3``: SeaweedFS ``weed server -s3``, data under ``<state>/s3-data``.
- ``mlflow``: ``mlflow server`` with a SQLite backend store in the state dir and proxied
  artifacts (``--serve-artifacts``) in the S3 store's bucket or in a folder.
- ``dashboard``: ``optuna-dashboard`` on an Optuna storage (default SQLite in the state dir).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from memel.errors import ConfigError
from memel.services import health
from memel.services.config import PORT_OPTIONS, REGION, ServicesConfig, StatePaths
from memel.services.credentials import S3Credentials
from memel.services.ports import free_ports, port_free
from memel.services.seaweed import (
    INSTALL_HINT,
    WeedPorts,
    find_weed,
    identities_json,
    weed_command,
)

WEED_VOLUME_SIZE_MB = 512
WEED_PRE_STOP_S = 1


@dataclass(frozen=True)
class ServiceSpec:
    """One server to start: ``ports`` maps the option that sets a port to the port."""

    name: str
    url: str
    argv: list[str]
    env: dict[str, str]
    check: Callable[[], None]
    ports: dict[str, int]
    private_files: dict[Path, str] = field(default_factory=dict, repr=False)
    prepare: Callable[[], None] | None = None


def _script(name: str) -> str | None:
    """A console script installed with this interpreter, else one on PATH."""
    for folder in (Path(sysconfig.get_paths()["scripts"]), Path(sys.executable).parent):
        if (folder / name).is_file():
            return str(folder / name)
    return shutil.which(name)


def _base_env() -> dict[str, str]:
    """This environment without MLflow settings meant for clients."""
    return {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}


def s3_spec(config: ServicesConfig, credentials: S3Credentials) -> ServiceSpec:
    """SeaweedFS with S3 on ``--s3-port``; its internal ports are kept in the state dir while free."""
    weed = find_weed()
    if weed is None:
        raise ConfigError(f"s3: the 'weed' binary (SeaweedFS) is not installed: {INSTALL_HINT}")
    paths = config.paths
    ports = WeedPorts(s3=config.ports["s3"], **_internal_ports(config, paths))
    url = config.url("s3")
    argv = weed_command(
        weed, paths.s3_data, paths.s3_identities, ports, config.host, WEED_VOLUME_SIZE_MB, WEED_PRE_STOP_S
    )
    return ServiceSpec(
        "s3",
        url,
        argv,
        _base_env(),
        functools.partial(health.s3_ready, url, credentials, config.bucket),
        {PORT_OPTIONS["s3"]: ports.s3},
        {paths.s3_identities: identities_json(credentials.access_key, credentials.secret_key)},
    )


def _internal_ports(config: ServicesConfig, paths: StatePaths) -> dict[str, int]:
    """The internal ports of the last start when all are still free, else fresh free ones."""
    taken = set(config.ports.values())
    try:
        kept = {name: int(port) for name, port in json.loads(paths.s3_ports.read_text()).items()}
        complete = set(kept) == set(WeedPorts.__dataclass_fields__) - {"s3"} and not taken & set(kept.values())
        if complete and all(port_free(config.host, port) for port in kept.values()):
            return kept
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    names = sorted(set(WeedPorts.__dataclass_fields__) - {"s3"})
    chosen = dict(zip(names, free_ports(config.host, len(names), exclude=taken), strict=True))
    paths.s3_data.mkdir(parents=True, exist_ok=True)
    paths.s3_ports.write_text(json.dumps(chosen))
    return chosen


def mlflow_spec(config: ServicesConfig, s3_endpoint: str | None, credentials: S3Credentials | None) -> ServiceSpec:
    """``mlflow server`` on ``--mlflow-port``; artifacts to the S3 bucket when ``s3_endpoint`` is given."""
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError("mlflow: MLflow is not installed in this Python: pip install 'mlflow>=3.17,<4'")
    paths = config.paths
    env = _base_env()
    if s3_endpoint is not None and credentials is not None:
        destination = f"s3://{config.bucket}"
        env.update(
            {
                "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
                "AWS_ACCESS_KEY_ID": credentials.access_key,
                "AWS_SECRET_ACCESS_KEY": credentials.secret_key,
                "AWS_DEFAULT_REGION": REGION,
            }
        )
    else:
        folder = (config.artifacts_dir or paths.mlflow_artifacts).expanduser().resolve()
        folder.mkdir(parents=True, exist_ok=True)
        destination = str(folder)
    port = config.ports["mlflow"]
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        config.host,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{paths.mlflow_db}",
        "--serve-artifacts",
        "--artifacts-destination",
        destination,
    ]
    url = config.url("mlflow")
    return ServiceSpec(
        "mlflow", url, argv, env, functools.partial(health.http_ok, f"{url}/health"), {PORT_OPTIONS["mlflow"]: port}
    )


def dashboard_spec(config: ServicesConfig) -> ServiceSpec:
    """``optuna-dashboard`` on ``--dashboard-port`` for the Optuna storage."""
    binary = _script("optuna-dashboard")
    if binary is None:
        raise ConfigError("dashboard: optuna-dashboard is not installed: pip install 'optuna-dashboard>=0.21'")
    port = config.ports["dashboard"]
    settings = config.paths.dashboard_config  # the storage URL may hold a password: not on the command line
    argv = [binary, "--from-config", str(settings), "--host", config.host, "--port", str(port)]
    url = f"{config.url('dashboard')}/dashboard"
    return ServiceSpec(
        "dashboard",
        url,
        argv,
        _base_env(),
        functools.partial(health.http_ok, url),
        {PORT_OPTIONS["dashboard"]: port},
        {settings: f"[optuna_dashboard]\nstorage = {json.dumps(config.dashboard_storage)}\n"},
        functools.partial(create_optuna_tables, config.dashboard_storage),
    )


def create_optuna_tables(storage: str) -> None:
    """Create Optuna's tables in an RDB storage that has none yet (optuna-dashboard only reads them)."""
    if "://" not in storage or storage.startswith("journal:"):
        return
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    import optuna

    try:
        optuna.storages.RDBStorage(storage).remove_session()
    except Exception as error:  # noqa: BLE001 - driver missing, server down: say which storage
        from memel.redaction import redact

        raise ConfigError(
            f"--optuna-storage: cannot open {redact(storage)!r}: {type(error).__name__}: {error}"
        ) from None
