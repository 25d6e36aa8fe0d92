"""``memel services up|down|status``: MLflow, an S3 store and optuna-dashboard on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from memel.commands.app import app
from memel.errors import ConfigError
from memel.services.config import DEFAULT_BUCKET, DEFAULT_PORTS

if TYPE_CHECKING:
    from memel.services import StatePaths

services_app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="Local MLflow server, S3-protocol store (SeaweedFS) and optuna-dashboard, for users without infrastructure.",
)
app.add_typer(services_app, name="services")

StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help="PID files, logs, databases, S3 data and credentials (default: $MEMEL_SERVICES_DIR, else ~/.memel/services).",
    ),
]
Only = Annotated[
    str | None, typer.Option("--only", help="Comma-separated subset of mlflow,s3,dashboard (default: all).")
]
STATE_COLOURS = {"running": "green", "stopped": "dim", "stale": "yellow"}


def _console() -> Console:
    """A console whose tables fit: at least 160 columns when output goes to a file or pipe."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 160))


def _fail(console: Console, error: Exception, code: int = 2) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(str(error))}")
    return typer.Exit(code)


def _paths(state_dir: Path | None) -> StatePaths:
    from memel.services import StatePaths, resolve_state_dir

    return StatePaths(resolve_state_dir(state_dir))


def _print_status(console: Console, paths: StatePaths) -> None:
    """The status table, then what to do next."""
    from memel.services import status

    rows = status(paths)
    table = Table(title=f"memel services in {paths.root}")
    for column in ("service", "state", "PID", "URL", "log"):
        table.add_column(column)
    for row in rows:
        colour = STATE_COLOURS[row.state]
        url = row.url if row.state == "running" else "-"
        table.add_row(
            row.service, f"[{colour}]{row.state}[/{colour}]", str(row.pid) if row.pid else "-", url, str(row.log)
        )
    console.print(table)
    running = {row.service: row for row in rows if row.state == "running"}
    if any(row.state == "stale" for row in rows):
        console.print(
            "[yellow]stale[/yellow]: a PID file whose process is gone or is no longer the one up started; "
            "[bold]memel services down[/bold] removes it without signalling anything, [bold]up[/bold] replaces it."
        )
    if not running:
        console.print("Start them: [bold]memel services up[/bold]")
        return
    console.print("Next:")
    if "mlflow" in running:
        console.print(
            f"  export MLFLOW_TRACKING_URI={running['mlflow'].url}", markup=False, highlight=False, soft_wrap=True
        )
    if "dashboard" in running:
        console.print(f"  optuna-dashboard: {running['dashboard'].url}", markup=False, highlight=False, soft_wrap=True)
    if "s3" in running:
        console.print(f"  S3 endpoint: {running['s3'].url}", markup=False, highlight=False, soft_wrap=True)
    if paths.env_sh.is_file():
        console.print(
            f"  source {paths.env_sh}   # sets {_env_names(paths.env_sh)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def _env_names(env_sh: Path) -> str:
    """What ``env.sh`` sets, in words (names only, never values)."""
    names = [
        line.split("=", 1)[0].removeprefix("export ")
        for line in env_sh.read_text().splitlines()
        if line.startswith("export ")
    ]
    keys = "AWS_ACCESS_KEY_ID" in names
    shown = [n for n in names if n in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")]
    return ", ".join(shown) + (" and the S3 keys" if keys else "") if shown or keys else "nothing (no service runs)"


@services_app.command("up", short_help="Start MLflow, the S3 store and optuna-dashboard (idempotent).")
def up_command(
    state_dir: StateDir = None,
    only: Only = None,
    host: Annotated[str, typer.Option("--host", help="Address every server binds to.")] = "127.0.0.1",
    mlflow_port: Annotated[int, typer.Option("--mlflow-port", help="MLflow tracking server port.")] = DEFAULT_PORTS[
        "mlflow"
    ],
    s3_port: Annotated[int, typer.Option("--s3-port", help="S3 API port of the SeaweedFS store.")] = DEFAULT_PORTS[
        "s3"
    ],
    dashboard_port: Annotated[int, typer.Option("--dashboard-port", help="optuna-dashboard port.")] = DEFAULT_PORTS[
        "dashboard"
    ],
    no_s3: Annotated[
        bool,
        typer.Option(
            "--no-s3",
            help="Do not start the S3 store; MLflow keeps artifacts in <state>/mlflow-artifacts (or --artifacts-dir).",
        ),
    ] = False,
    artifacts_dir: Annotated[
        Path | None,
        typer.Option("--artifacts-dir", help="Keep MLflow artifacts in this folder instead of the S3 bucket."),
    ] = None,
    bucket: Annotated[
        str, typer.Option("--bucket", help="S3 bucket for MLflow artifacts (created if missing).")
    ] = DEFAULT_BUCKET,
    optuna_storage: Annotated[
        str | None,
        typer.Option(
            "--optuna-storage", help="Storage URL optuna-dashboard opens (default: sqlite:///<state>/optuna.db)."
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1, help="Seconds to wait for each server to answer.")
    ] = 120.0,
) -> None:
    """Start the MLflow tracking server (SQLite store, artifacts proxied to the S3 bucket), the
    SeaweedFS S3 store and optuna-dashboard, detached, bound to 127.0.0.1. Services already
    running from the state dir are left alone; the S3 keys come from AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY, else are generated once into the state dir.

    Example: [bold]memel services up --mlflow-port 5001 --only mlflow,s3[/bold]
    """
    from memel.services import (
        ServiceError,
        ServicesConfig,
        parse_only,
        resolve_state_dir,
        up,
    )

    console = _console()
    try:
        config = ServicesConfig(
            state_dir=resolve_state_dir(state_dir),
            host=host,
            only=parse_only(only),
            use_s3=not no_s3,
            ports={"mlflow": mlflow_port, "s3": s3_port, "dashboard": dashboard_port},
            artifacts_dir=artifacts_dir,
            bucket=bucket,
            optuna_storage=optuna_storage,
            start_timeout_s=timeout,
        )
        results = up(config, notify=lambda line: console.print(f"[dim]{escape(line)}[/dim]"))
    except ConfigError as error:
        raise _fail(console, error) from None
    except ServiceError as error:
        console.print(f"[red]error:[/red] {escape(str(error))}; the services this command started were stopped again")
        console.print(f"--- last lines of {error.log} ---", markup=False, highlight=False, soft_wrap=True)
        console.print(error.log_tail, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    for result in results:
        colour = "green" if result.action == "started" else "cyan"
        console.print(f"[{colour}]{result.service}[/{colour}] {result.action} (pid {result.pid}) at {result.url}")
    _print_status(console, config.paths)


@services_app.command("down", short_help="Stop what up started (PID-checked; idempotent).")
def down_command(
    state_dir: StateDir = None,
    only: Only = None,
    timeout: Annotated[float, typer.Option("--timeout", min=0, help="Seconds after SIGTERM before SIGKILL.")] = 30.0,
) -> None:
    """Stop what [bold]memel services up[/bold] started from the state dir: SIGTERM to each
    server's process group, SIGKILL after --timeout, PID files removed. A PID that is no longer
    the recorded process is never signalled. Running it again is harmless.

    Example: [bold]memel services down --only dashboard[/bold]
    """
    from memel.services import down, parse_only

    console = _console()
    try:
        selected = parse_only(only)
    except ConfigError as error:
        raise _fail(console, error) from None
    paths = _paths(state_dir)
    if not paths.root.is_dir():
        console.print(f"nothing to stop: no state dir {paths.root}")
        return
    for result in down(paths, selected, timeout, notify=lambda line: console.print(f"[dim]{escape(line)}[/dim]")):
        if result.action == "stale":
            console.print(
                f"[yellow]{result.service}[/yellow]: removed a stale PID file (pid {result.pid} is not the process up started; not signalled)"
            )
            if result.leftover:
                console.print(
                    f"[yellow]warning:[/yellow] its process group still holds pids {', '.join(map(str, result.leftover))} "
                    "(left running: check them with ps and stop them yourself)"
                )
        elif result.action == "not running":
            console.print(f"[dim]{result.service}: not running[/dim]")
        else:
            console.print(f"[green]{result.service}[/green] {result.action} (pid {result.pid})")


@services_app.command("status", short_help="State, PID, URL and log of each service; what to do next.")
def status_command(state_dir: StateDir = None) -> None:
    """Show each service's state (running, stopped, stale), PID, URL and log, and how to use them.
    Exits 0 whether or not they run.

    Example: [bold]memel services status --state-dir /tmp/memel-services[/bold]
    """
    _print_status(_console(), _paths(state_dir))
