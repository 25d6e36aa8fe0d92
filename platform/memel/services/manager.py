"""``up``, ``down`` and ``status`` over the state directory (the CLI only prints their results)."""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from memel.errors import ConfigError
from memel.services import definitions
from memel.services.config import SERVICES, ServicesConfig, StatePaths
from memel.services.credentials import (
    S3Credentials,
    load_or_create,
    s3_client_env,
    write_env_file,
    write_private,
)
from memel.services.health import wait_ready
from memel.services.ports import port_free
from memel.services.process import (
    ProcessRecord,
    State,
    StopOutcome,
    group_members,
    start_detached,
    start_time,
    state_of,
    stop,
)

Notify = Callable[[str], None]


@dataclass(frozen=True)
class ServiceStatus:
    """One row of ``memel services status``."""

    service: str
    state: State
    pid: int | None
    url: str | None
    log: Path


@dataclass(frozen=True)
class UpResult:
    """What ``up`` did for one service."""

    service: str
    action: Literal["started", "already running"]
    pid: int
    url: str


@dataclass(frozen=True)
class DownResult:
    """What ``down`` did for one service: ``stale`` means a PID file was removed and nothing signalled."""

    service: str
    action: StopOutcome | Literal["not running"]
    pid: int | None
    leftover: tuple[int, ...] = ()
    """For ``stale``: processes still in the recorded process group after its leader exited (not signalled)."""


@contextlib.contextmanager
def state_lock(paths: StatePaths) -> Iterator[None]:
    """One ``up``/``down`` at a time per state directory."""
    paths.create()
    with open(paths.root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def status(paths: StatePaths) -> list[ServiceStatus]:
    """Each service's state from its PID record (``stale``: a record whose process is gone or not ours)."""
    rows = []
    for service in SERVICES:
        record = ProcessRecord.load(paths.pid_file(service))
        state = state_of(record)
        rows.append(
            ServiceStatus(
                service, state, record.pid if record else None, record.url if record else None, paths.log_file(service)
            )
        )
    return rows


def _running(paths: StatePaths) -> dict[str, ProcessRecord]:
    records = {service: ProcessRecord.load(paths.pid_file(service)) for service in SERVICES}
    return {
        service: record for service, record in records.items() if record is not None and state_of(record) == "running"
    }


def up(config: ServicesConfig, notify: Notify = lambda _: None) -> list[UpResult]:
    """Start the selected services that are not running from this state dir; wait until each answers.

    Raises ConfigError (a port in use, a missing binary: nothing started) or ServiceError (a
    server did not answer: the ones this call started are stopped again).
    """
    paths = config.paths
    with state_lock(paths):
        running = _running(paths)
        for service in config.only:
            if service not in running:
                paths.pid_file(service).unlink(missing_ok=True)  # a stale record, if any
        wanted = [service for service in config.only if service not in running]
        credentials = load_or_create(paths) if ("s3" in wanted or "s3" in running or config.artifacts_to_s3) else None
        specs = _specs(config, wanted, running, credentials)
        _check_ports(config, specs)
        for spec in specs:
            if spec.prepare is not None:
                spec.prepare()
        started: dict[str, tuple[subprocess.Popen, ProcessRecord]] = {}
        try:
            for spec in specs:
                for path, text in spec.private_files.items():
                    write_private(path, text)
                process, record = start_detached(
                    spec.name, spec.argv, spec.env, paths.root, paths.log_file(spec.name), spec.url
                )
                record.save(paths.pid_file(spec.name))
                started[spec.name] = (process, record)
                notify(f"{spec.name}: started (pid {record.pid}), waiting for {spec.url}")
            for spec in specs:
                wait_ready(
                    spec.name, spec.check, started[spec.name][0], paths.log_file(spec.name), config.start_timeout_s
                )
                notify(f"{spec.name}: answering at {spec.url}")
        except BaseException:
            _stop_all({name: record for name, (_, record) in started.items()}, timeout_s=10)
            for name in started:
                paths.pid_file(name).unlink(missing_ok=True)
            raise
        _write_env(paths, _running(paths), credentials)
    results = [UpResult(s, "already running", running[s].pid, running[s].url) for s in config.only if s in running]
    results += [UpResult(name, "started", record.pid, record.url) for name, (_, record) in started.items()]
    return sorted(results, key=lambda result: SERVICES.index(result.service))


def _specs(
    config: ServicesConfig, wanted: list[str], running: dict[str, ProcessRecord], credentials: S3Credentials | None
) -> list[definitions.ServiceSpec]:
    """The servers to start, in order; ConfigError when a binary or the S3 store MLflow needs is missing."""
    specs = []
    for service in wanted:
        if service == "s3":
            assert credentials is not None
            specs.append(definitions.s3_spec(config, credentials))
        elif service == "mlflow":
            endpoint = None
            if config.artifacts_to_s3:
                if "s3" in running:
                    endpoint = running["s3"].url
                elif "s3" in wanted:
                    endpoint = config.url("s3")
                else:
                    raise ConfigError(
                        "mlflow: its artifacts go to the local S3 store, which is not running: include s3 in --only, "
                        "or keep artifacts in a folder with --no-s3 or --artifacts-dir DIR"
                    )
            specs.append(definitions.mlflow_spec(config, endpoint, credentials))
        else:
            specs.append(definitions.dashboard_spec(config))
    return specs


def _check_ports(config: ServicesConfig, specs: list[definitions.ServiceSpec]) -> None:
    """ConfigError naming every port in use and the option that changes it (nothing is started)."""
    problems = [
        f"{spec.name}: port {port} on {config.host} is already in use; choose another with {option} PORT"
        for spec in specs
        for option, port in spec.ports.items()
        if not port_free(config.host, port)
    ]
    if problems:
        raise ConfigError("; ".join(problems))


def _write_env(paths: StatePaths, running: dict[str, ProcessRecord], credentials: S3Credentials | None) -> None:
    """``env.sh`` for the running services: MLFLOW_TRACKING_URI and the S3 endpoint and keys."""
    variables: dict[str, str] = {}
    if "mlflow" in running:
        variables["MLFLOW_TRACKING_URI"] = running["mlflow"].url
    if "s3" in running and credentials is not None:
        variables.update(s3_client_env(running["s3"].url, credentials))
    write_env_file(paths.env_sh, variables)


def _stop_all(records: dict[str, ProcessRecord], timeout_s: float) -> dict[str, StopOutcome]:
    """:func:`stop` every record at once (SeaweedFS alone takes about 15 s to shut down)."""
    with ThreadPoolExecutor(max_workers=len(SERVICES)) as pool:
        futures = {service: pool.submit(stop, record, timeout_s) for service, record in records.items()}
    return {service: future.result() for service, future in futures.items()}


def down(
    paths: StatePaths, only: tuple[str, ...] = SERVICES, timeout_s: float = 30.0, notify: Notify = lambda _: None
) -> list[DownResult]:
    """Stop the services ``up`` started from this state dir (all at once) and remove their PID
    files. A record whose PID is no longer that process is removed without signalling anything."""
    with state_lock(paths):
        records = {service: ProcessRecord.load(paths.pid_file(service)) for service in SERVICES if service in only}
        for service, record in records.items():
            if record is not None and state_of(record) == "running":
                notify(f"{service}: stopping pid {record.pid}")
        actions = _stop_all({service: record for service, record in records.items() if record is not None}, timeout_s)
        results = []
        for service, record in records.items():
            paths.pid_file(service).unlink(missing_ok=True)
            if record is None:
                results.append(DownResult(service, "not running", None))
            else:
                leftover = (
                    tuple(group_members(record.pid))
                    if actions[service] == "stale" and start_time(record.pid) is None
                    else ()
                )
                results.append(DownResult(service, actions[service], record.pid, leftover))
    return results
