"""``memel submit``, ``memel status``, ``memel logs``, ``memel stop``: jobs on a Ray cluster
through Ray's Job Submission API, authenticated with the cluster's token."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from memel.commands.app import app

if TYPE_CHECKING:
    from ray.job_submission import JobDetails

    from memel.submission.client import Cluster


class JobCommand(str, Enum):
    """The memel command the job runs on the cluster."""

    run = "run"
    tune = "tune"
    train = "train"


Address = Annotated[
    str | None,
    typer.Option(
        "--address",
        help="Ray dashboard of the cluster, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, else RAY_ADDRESS).",
    ),
]
TokenFile = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help="File holding the cluster's auth token (default: RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token).",
    ),
]
SubmissionId = Annotated[
    str, typer.Argument(metavar="SUBMISSION_ID", help="The id memel submit printed (memel-<job>-<hash>).")
]


def _fail(console: Console, error: Exception, code: int) -> typer.Exit:
    from memel.commands.report import error_exit

    return error_exit(console, error, code)


@contextlib.contextmanager
def _calls(console: Console) -> Iterator[None]:
    """Submission errors become one red line and an exit code: bad input or auth 2, the cluster 1."""
    from memel.submission import ClusterAuthError, ClusterError, SubmissionError

    try:
        yield
    except ClusterAuthError as error:
        raise _fail(console, error, 2) from None
    except ClusterError as error:
        raise _fail(console, error, 1) from None
    except SubmissionError as error:
        raise _fail(console, error, 2) from None
    except KeyboardInterrupt:
        console.print("\ninterrupted: the job keeps running on the cluster (memel stop SUBMISSION_ID stops it)")
        raise typer.Exit(130) from None


def _connect(console: Console, address: str | None, token_file: Path | None) -> Cluster:
    """Resolve the address and the token, then connect (checks the cluster's version and the token)."""
    from memel.submission import find_token
    from memel.submission.client import Cluster, resolve_address

    with _calls(console):
        return Cluster(resolve_address(address), find_token(token_file))


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _duration(job: JobDetails) -> str:
    if not job.start_time:
        return "-"
    seconds = ((job.end_time or time.time() * 1000) - job.start_time) / 1000
    return f"{seconds:,.0f} s"


def _status_style(status: str) -> str:
    colour = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow", "RUNNING": "cyan"}.get(status, "white")
    return f"[{colour}]{status}[/{colour}]"


def _follow(console: Console, cluster: Cluster, submission_id: str) -> None:
    from memel.submission.follow import exit_code, follow_job, status_of

    with _calls(console):
        job = follow_job(cluster, submission_id)
    console.print(f"[bold]{submission_id}[/bold] {_status_style(status_of(job))}: {escape(job.message or '')}")
    raise typer.Exit(exit_code(job))


@app.command("submit")
def submit_command(
    job_path: Annotated[Path, typer.Argument(metavar="JOB.yaml", help="Job spec inside the project (see jobs/).")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a field: dotted.key=value (repeatable).")
    ] = None,
    command: Annotated[
        JobCommand, typer.Option("--command", help="The memel command the job runs on the cluster.")
    ] = JobCommand.run,
    address: Address = None,
    token_file: TokenFile = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env", metavar="NAME", help="Also forward this environment variable (repeatable; only its name is shown)."
        ),
    ] = None,
    include: Annotated[
        list[str] | None,
        typer.Option(
            "--include",
            metavar="PATH",
            help="Also upload this project file, folder or glob though git does not track it (repeatable).",
        ),
    ] = None,
    pip: Annotated[
        bool,
        typer.Option(
            "--pip", help="Install memel's requirements on the cluster, pinned to the versions installed here."
        ),
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the job to its end, streaming its logs; exit 0 on SUCCEEDED, else 1.")
    ] = False,
) -> None:
    """Submit a job to a Ray cluster: the project folder travels as the working dir and the
    cluster runs [bold]memel <command> JOB.yaml --set ...[/bold] there. The spec is validated here
    first. The submission id is derived from the command, the job file and the overrides, so
    submitting the same thing again reports the existing job instead of starting a duplicate.
    MLflow and S3 settings (MLFLOW_TRACKING_*, AWS_*) are forwarded when set, except secrets, which the
    cluster's nodes must hold themselves (Ray logs a job's environment); values are never shown.
    Files git does not track stay behind (they are listed); --include PATH uploads one on purpose.

    Example: [bold]memel submit jobs/smoke.yaml --address http://HEAD:8265 --token-file ~/.ray/cluster_token --set train.steps=40 --wait[/bold]
    """
    from memel.errors import ConfigError
    from memel.redaction import redact
    from memel.submission import SubmissionError, SubmitRequest, plan_job
    from memel.submission.client import resolve_address
    from memel.submission.follow import status_of

    console = Console()
    try:
        resolved = resolve_address(address)
        plan = plan_job(
            SubmitRequest(
                job_path, resolved, command.value, tuple(set_ or ()), tuple(env or ()), pip, tuple(include or ())
            )
        )
    except (ConfigError, SubmissionError) as error:
        raise _fail(console, error, 2) from None
    table = Table(title=f"memel submit {plan.submission_id}", show_header=False)
    table.add_row("cluster", escape(redact(resolved)))
    table.add_row("entrypoint", escape(redact(plan.entrypoint)))
    table.add_row("working_dir", f"{plan.project_root} (without {', '.join(plan.runtime_env['excludes'][:6])}, ...)")
    if plan.left_out:
        shown = ", ".join(plan.left_out[:8]) + (f", ... ({len(plan.left_out)} files)" if len(plan.left_out) > 8 else "")
        table.add_row("left out", escape(f"{shown} ({plan.left_out_reason}; add one with --include PATH)"))
    table.add_row("forwarded env", ", ".join(plan.env_names) or "-")
    if "pip" in plan.runtime_env:
        table.add_row("pip", f"{len(plan.runtime_env['pip'])} pinned requirements")
    console.print(table)
    if plan.withheld_env:
        console.print(
            f"note: not sent: {', '.join(plan.withheld_env)} (secrets: Ray writes a job's environment to the cluster's "
            "logs); the cluster's nodes must have them in their own environment (e.g. a Kubernetes Secret)"
        )

    cluster = _connect(console, resolved, token_file)
    console.print(f"token: {escape(cluster.token.source)}; uploading the project and submitting...")
    with _calls(console):
        job, submitted = cluster.submit(plan)
    status = status_of(job)
    if submitted:
        console.print(f"submitted [bold]{plan.submission_id}[/bold] ({_status_style(status)})")
    else:
        console.print(
            f"already on the cluster: [bold]{plan.submission_id}[/bold] {_status_style(status)}: {escape(job.message or '')}"
        )
        if status in ("FAILED", "STOPPED") and not wait:
            console.print("to run it again, change an override or delete it: ray job delete " + plan.submission_id)
    if wait:
        _follow(console, cluster, plan.submission_id)
    console.print(
        f"follow it: [bold]memel logs {plan.submission_id} --follow[/bold]; status: [bold]memel status {plan.submission_id}[/bold]"
    )


@app.command("status")
def status_command(
    submission_id: Annotated[
        str | None, typer.Argument(metavar="SUBMISSION_ID", help="One job; without it, a table of memel jobs.")
    ] = None,
    address: Address = None,
    token_file: TokenFile = None,
    all_jobs: Annotated[bool, typer.Option("--all", help="Also list jobs not submitted by memel.")] = False,
) -> None:
    """Show one job's status, or a table of the memel jobs on the cluster.

    Example: [bold]memel status --address http://HEAD:8265[/bold]
    """
    from memel.submission.follow import status_of
    from memel.submission.job import ID_PREFIX

    console = Console()
    cluster = _connect(console, address, token_file)
    if submission_id:
        with _calls(console):
            job = cluster.job(submission_id)
        table = Table(title=submission_id, show_header=False)
        table.add_row("status", _status_style(status_of(job)))
        table.add_row("message", escape(job.message or "-"))
        table.add_row("entrypoint", escape(job.entrypoint or "-"))
        table.add_row("started", _when(job.start_time))
        table.add_row("ended", _when(job.end_time))
        table.add_row("duration", _duration(job))
        console.print(table)
        return
    with _calls(console):
        jobs = cluster.jobs()
    shown = [job for job in jobs if all_jobs or (job.submission_id or "").startswith(ID_PREFIX)]
    table = Table(title=f"memel jobs on {cluster.address}")
    for column in ("submission id", "status", "command", "started", "duration", "message"):
        table.add_column(column)
    for job in shown:
        meta = job.metadata or {}
        table.add_row(
            job.submission_id or job.job_id or "-",
            _status_style(status_of(job)),
            meta.get("memel_command", "-"),
            _when(job.start_time),
            _duration(job),
            escape((job.message or "")[:80]),
        )
    console.print(table)
    if len(shown) < len(jobs):
        console.print(f"{len(jobs) - len(shown)} other job(s) not shown (--all shows them)")


@app.command("logs")
def logs_command(
    submission_id: SubmissionId,
    address: Address = None,
    token_file: TokenFile = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends; exit 0 on SUCCEEDED, else 1.")
    ] = False,
) -> None:
    """Print a job's logs (its driver's stdout and stderr), or follow them until it ends.

    Example: [bold]memel logs memel-smoke-0123456789 --follow[/bold]
    """
    from memel.submission.follow import write_stdout

    console = Console()
    cluster = _connect(console, address, token_file)
    if follow:
        _follow(console, cluster, submission_id)
    with _calls(console):
        write_stdout(cluster.logs(submission_id))


@app.command("stop")
def stop_command(submission_id: SubmissionId, address: Address = None, token_file: TokenFile = None) -> None:
    """Stop a running job (its processes get SIGTERM, then SIGKILL).

    Example: [bold]memel stop memel-smoke-0123456789 --address http://HEAD:8265[/bold]
    """
    from memel.submission.follow import status_of

    console = Console()
    cluster = _connect(console, address, token_file)
    with _calls(console):
        stopped = cluster.stop(submission_id)
        job = cluster.job(submission_id)
    if stopped:
        console.print(f"stopping [bold]{submission_id}[/bold] (now {_status_style(status_of(job))})")
    else:
        console.print(f"{submission_id} had already ended: {_status_style(status_of(job))}")
