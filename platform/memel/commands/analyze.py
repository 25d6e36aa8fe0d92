"""``memel analyze``: offline emergence analysis of a sweep; ``memel bench analyze``: its aggregation speed."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from memel.commands.app import app, bench_app
from memel.commands.report import error_exit
from memel.commands.run import make_console
from memel.errors import ConfigError

SECTION_NAMES = "ablation, case_study, significance"
OUT_OPTION = typer.Option(
    None, "--out", help="Where to write the report, figures and tables (default: <sweep folder>/analysis)."
)
SKIP_OPTION = typer.Option([], "--skip", help=f"Leave out a section (repeatable or comma-separated): {SECTION_NAMES}.")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _ci(row: dict[str, Any], column: str) -> str:
    prefix = f"{column}_" if column else ""
    low, high = row.get(f"{prefix}ci_low"), row.get(f"{prefix}ci_high")
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return "-"
    return f"[{low:.3g}, {high:.3g}]"


def print_summary(console: Any, analysis: Any) -> None:
    """The terminal summary: one table per section, then the notes."""

    ratio = analysis.ratio
    if ratio is not None and len(ratio.by_rung) and ratio.by_rung["ratio_mean"].notna().any():
        table = Table(title=f"Monosemantic ratio at the end of training ({analysis.criterion.describe()})")
        for column in ("rung", "params", "mode", "runs", "mean", "95% CI", "null", "significant runs"):
            table.add_column(column, justify="left" if column in ("rung", "mode") else "right")
        for row in ratio.by_rung.sort_values(["n_params", "variant"]).to_dict("records"):
            measured = not math.isnan(row["ratio_mean"])
            significant = int(row["significant_runs"]) if measured else 0
            table.add_row(
                row["model"],
                f"{row['n_params']:,}",
                row["variant"],
                f"{row['ratio_n']}/{row['runs']}",
                (_fmt(row["ratio_mean"]) if significant else f"{_fmt(row['ratio_mean'])} (n.s.)")
                if measured
                else "not measurable",
                _ci(row, "ratio") if measured else "-",
                _fmt(row["null_ratio_max"], 2) if measured else "-",
                f"{significant}/{row['ratio_n']}" if measured else "-",
            )
        console.print(table)
        console.print(f"  null: {analysis.criterion.null_text()}; (n.s.): no run significant against it (p >= 0.05)")
    if analysis.ablation_summary is not None:
        options = analysis.options
        table = Table(
            title=f"Mean-ablation of the best-probed {options.probe_group!r} neuron: % loss increase per token group "
            f"(over seeds; control: {options.control_draws} draws of as many random neurons)"
        )
        for column in (
            "rung",
            "params",
            "mode",
            "group",
            "AUROC",
            "seeds",
            "% increase",
            "95% CI",
            "random %",
            "95% CI ",
        ):
            table.add_column(column, justify="left" if column in ("rung", "mode", "group") else "right")
        for row in analysis.ablation_summary.sort_values(["variant", "n_params", "group"]).to_dict("records"):
            table.add_row(
                row["model"],
                f"{row['n_params']:,}",
                row["variant"],
                row["group"],
                _fmt(row["auroc_mean"], 3),
                str(row["increase_pct_n"]),
                _fmt(row["increase_pct_mean"], 3),
                _ci(row, "increase_pct"),
                _fmt(row["random_increase_pct_mean"], 3),
                _ci(row, "random_increase_pct"),
            )
        console.print(table)
        trends = analysis.ablation_summary.drop_duplicates(["variant", "group"])
        for row in trends.to_dict("records"):
            console.print(
                f"  size trend, {row['variant']} {row['group']}: % increase {_fmt(row['trend_slope'], 3)} per tenfold "
                f"size {_ci(row, 'trend')}, excess over random {_fmt(row['excess_trend_slope'], 3)} {_ci(row, 'excess_trend')}"
            )
    if analysis.case_summary is not None:
        summary = analysis.case_summary
        for (variant, lr_name, selection), part in summary.groupby(["variant", "lr_name", "selection"], sort=False):
            weights = (
                f"the weights of {analysis.case_member}"
                if variant == "shared"
                else "each mode from its own trained member"
            )
            table = Table(
                title=f"Case study on {weights} ({selection} selection, lr {lr_name} = {part['lr'].iloc[0]:.3g}): "
                f"one step per mode, {int(part['batches'].max())} batches"
            )
            for column in (
                "mode",
                "Decrease Ratio %",
                "95% CI",
                "- original",
                "95% CI ",
                "- naive_b",
                "95% CI  ",
                "Total Update %",
                "quotient",
                "alignment",
                "paper DR %",
                "paper TUR %",
            ):
                table.add_column(column, justify="left" if column == "mode" else "right")
            for row in part.to_dict("records"):
                table.add_row(
                    row["mode"],
                    _fmt(row["decrease_ratio"]),
                    _ci(row, "decrease_ratio"),
                    _fmt(row["decrease_ratio_vs_original"]),
                    _ci(row, "decrease_ratio_vs_original"),
                    _fmt(row["decrease_ratio_vs_naive_b"]),
                    _ci(row, "decrease_ratio_vs_naive_b"),
                    _fmt(row["update_ratio"]),
                    _fmt(row["quotient"]),
                    _fmt(row["alignment"], 3),
                    _fmt(row["paper_decrease_ratio"]),
                    _fmt(row["paper_total_update_ratio"]),
                )
            console.print(table)
        if analysis.case_verdicts is not None and len(analysis.case_verdicts):
            table = Table(
                title="Table 4's orderings of the Decrease Ratio (paired by batch; reproduced: 95% CI above 0)"
            )
            for column in ("variant", "lr", "claim", "difference %", "95% CI", "paper %", "verdict"):
                table.add_column(column, justify="left" if column in ("variant", "lr", "claim", "verdict") else "right")
            for row in analysis.case_verdicts.to_dict("records"):
                table.add_row(
                    row["variant"],
                    row["lr_name"],
                    row["claim"],
                    _fmt(row["difference"]),
                    _ci(row, "difference"),
                    _fmt(row["paper_difference"]),
                    row["verdict"],
                )
            console.print(table)
    if analysis.significance is not None and len(analysis.significance):
        table = Table(
            title="Paired t-tests, inhibited vs original (same rung and seed); t < 0: inhibited lower; "
            "power: the difference detectable at 80%, and the power against the paper's effect"
        )
        columns = (
            "metric",
            "comparison",
            "scope",
            "pairs",
            "mean orig.",
            "difference [95% CI]",
            "t",
            "p",
            "detectable",
            "power@paper",
        )
        for column in columns:
            table.add_column(column, justify="left" if column in ("metric", "comparison", "scope") else "right")
        for row in analysis.significance.to_dict("records"):
            difference = f"{_fmt(row['mean_difference'], 3)} [{_fmt(row['ci_low'], 3)}, {_fmt(row['ci_high'], 3)}]"
            table.add_row(
                row["metric"],
                row["comparison"],
                row["scope"],
                str(row["pairs"]),
                _fmt(row["mean_original"]),
                difference,
                _fmt(row["t"], 3),
                _fmt(row["p"], 3),
                _fmt(row["detectable_80"], 3),
                _fmt(row["power_at_paper"], 2),
            )
        console.print(table)
    print_agreement(console, analysis)
    print_convergence(console, analysis)
    for note in analysis.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


def print_agreement(console: Any, analysis: Any) -> None:
    """The ratio's flag against the probe's AUROC, over members."""
    summary = analysis.probe_agreement_summary
    if summary is None:
        return
    per_member = analysis.probe_agreement
    table = Table(title="The monosemantic ratio's flag against the probe's AUROC (0.5 / 0: no relation; over members)")
    for column in ("measure", "members", "mean", "95% CI", "members p < 0.05", "agrees"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    for row in summary.to_dict("records"):
        table.add_row(
            row["measure"],
            str(row["members"]),
            _fmt(row["mean"], 3),
            _ci(row, ""),
            str(row["members_significant"]),
            "yes" if row["agrees"] else "no",
        )
    console.print(table)
    console.print(
        f"  flagged neurons: {int(per_member['flagged'].sum())} of {int(per_member['matched'].sum())}; "
        f"the probe's best neuron flagged in {int(per_member['best_flagged'].sum())} of {len(per_member)} members"
    )


def print_convergence(console: Any, analysis: Any) -> None:
    """One line: how many members' held-out loss flattened, and the largest relative tail drop."""
    frame = analysis.convergence
    if frame is None:
        return
    options = analysis.options
    console.print(
        f"convergence: held-out loss flattened in {int(frame['flattened'].sum())} of {len(frame)} members (the last "
        f"{options.flat_tail:.0%} of training gained < {options.flat_threshold:.0%} of the total drop; largest: "
        f"{_fmt(float(frame['relative'].max()), 3)})"
    )


def unreadable_statistics() -> tuple[type[BaseException], ...]:
    """The errors Arrow and DuckDB raise for a Parquet file they cannot read."""
    import duckdb
    import pyarrow as pa

    return (pa.ArrowException, duckdb.Error)


@app.command("analyze")
def analyze_command(
    target: str = typer.Argument(
        ...,
        metavar="TARGET",
        help="A sweep's output folder (runs/<job>), its MLflow parent run id, or a Parquet statistics root (local or s3://).",
    ),
    out: Path | None = OUT_OPTION,
    tracking_uri: str | None = typer.Option(
        None,
        "--tracking-uri",
        help="MLflow tracking URI for a run-id TARGET (default: MLFLOW_TRACKING_URI, else the sweep folder's store).",
    ),
    threshold: float | None = typer.Option(
        None,
        help="MS threshold (default: the runs' inhibition.ms_threshold; the ratio needs 36, see docs/monosemanticity.md).",
    ),
    min_fraction: float = typer.Option(
        0.005,
        help="Fraction of samples above the threshold that makes a neuron monosemantic (0: any sample, from max_ms).",
    ),
    alpha: float = typer.Option(
        1e-3,
        help="Largest chance that a featureless neuron is flagged; module snapshots with too few samples for it are not counted.",
    ),
    depth_bins: int = typer.Option(5, help="Relative-depth bins of the heatmap."),
    probe_group: str = typer.Option(
        "python-code", help="Ablation: the token group the probe looks for (a document label of the held-out text)."
    ),
    probe_neurons: int = typer.Option(1, help="Ablation: best-probed neurons mean-ablated together (the paper: 1)."),
    control_draws: int = typer.Option(8, help="Ablation: random draws of as many neurons (the control)."),
    ablation_batches: int = typer.Option(16, help="Ablation: held-out batches per member (half probe, half measure)."),
    batch_size: int | None = typer.Option(
        None, help="Batch size of the ablation and case study (default: the run's micro batch)."
    ),
    case_member: str | None = typer.Option(
        None, help="Case study member (run id or member key; default: the largest rung's original member)."
    ),
    case_batches: int = typer.Option(
        50, help="Case study: fixed training batches (each one step per mode, paired across modes)."
    ),
    case_lr: list[str] = typer.Option(
        ["run", "2e-6"],
        "--case-lr",
        help="Case study: learning rate of the one step, repeatable: run (the member's last) or a number.",
    ),
    case_optimizer: str = typer.Option("run", help="Case study: run (the member's AdamW with its saved state) or sgd."),
    case_random: bool = typer.Option(
        True, "--case-random/--no-case-random", help="Case study: the random-selection control."
    ),
    case_own: bool = typer.Option(
        True,
        "--case-own/--no-case-own",
        help="Case study: also step each mode from its own trained member (when the sweep has them).",
    ),
    skip: list[str] = SKIP_OPTION,
    mlflow: bool = typer.Option(
        True, "--mlflow/--no-mlflow", help="Log the outputs as artifacts of the sweep's parent run."
    ),
    memory_limit: str = typer.Option("1GB", help="DuckDB memory limit of the aggregation (it spills beyond)."),
    flat_tail: float = typer.Option(
        0.25, help="Convergence: the last fraction of the steps whose held-out loss drop is compared with the total."
    ),
    flat_threshold: float = typer.Option(
        0.05, help="Convergence: flattened when that tail drop is below this share of the total drop."
    ),
) -> None:
    """Offline emergence analysis of a sweep: monosemantic ratio vs scale (over steps, by depth),
    mean-ablation of a probed feature neuron (Figure 2), inhibition case study (Table 4) and paired t-tests (Table 9).
    Writes PNG figures, CSV/Parquet tables and one self-contained report.html, logs them to the
    sweep's MLflow parent run and prints a summary.

    Example: [bold]memel analyze runs/quickstart[/bold]   (or: memel analyze PARENT_RUN_ID --tracking-uri http://127.0.0.1:5000)
    """
    from memel.analysis import Options, analyze, log_to_mlflow, resolve, write
    from memel.analysis.pipeline import SECTIONS

    console = make_console()
    started = time.perf_counter()
    try:
        skipped = {name.strip() for item in skip for name in item.split(",") if name.strip()}
        if skipped - set(SECTIONS):
            raise ConfigError(f"--skip: unknown section(s) {sorted(skipped - set(SECTIONS))}; allowed: {SECTION_NAMES}")
        options = Options(
            threshold=threshold,
            min_fraction=min_fraction,
            alpha=alpha,
            depth_bins=depth_bins,
            probe_group=probe_group,
            probe_neurons=probe_neurons,
            control_draws=control_draws,
            ablation_batches=ablation_batches,
            batch_size=batch_size,
            case_member=case_member,
            case_batches=case_batches,
            case_lrs=tuple(case_lr),
            case_optimizer=case_optimizer,
            case_random=case_random,
            case_own=case_own,
            sections=tuple(s for s in SECTIONS if s not in skipped),
            memory_limit=memory_limit,
            flat_tail=flat_tail,
            flat_threshold=flat_threshold,
        )
        source = resolve(target, tracking_uri)
        console.print(
            f"[bold]memel analyze[/bold] {target}: {len(source.members)} members, statistics {source.stats_root}"
        )
        analysis = analyze(source, options, notify=lambda message: console.print(f"[dim]{message}[/dim]"))
    except ConfigError as error:
        raise error_exit(console, error) from None
    except unreadable_statistics() as error:  # a truncated or corrupt Parquet file under the statistics root
        raise error_exit(
            console,
            f"TARGET: a statistics file cannot be read ({error}); remove or restore the damaged file and run again",
        ) from None
    folder = out or source.default_out()
    written = write(analysis, folder)
    print_summary(console, analysis)
    console.print(
        f"Report: [bold]{(folder / 'report.html').resolve()}[/bold] (open it in a browser; {len(written)} files in {folder})"
    )
    if mlflow:
        from memel.redaction import redact

        try:
            where = log_to_mlflow(analysis, folder)
        except Exception as error:  # noqa: BLE001 - the local outputs are written; say why MLflow did not get them
            console.print(
                f"[yellow]warning:[/yellow] could not log to MLflow ({redact(f'{type(error).__name__}: {error}')})"
            )
        else:
            console.print(
                f"MLflow: artifacts {where} at {redact(str(source.tracking_uri))}"
                if where
                else "MLflow: no parent run known for this TARGET; nothing logged"
            )
    console.print(f"done in {time.perf_counter() - started:,.1f} s")


@bench_app.command("analyze")
def bench_analyze_command(
    snapshots: int = typer.Option(50, help="Snapshots of 24 modules x 4,096 neurons (50: 4.9M rows)."),
    full: bool = typer.Option(
        False, "--full", help="The issue's size: 1,018 snapshots = 100M neuron rows (about 2 GB of Parquet)."
    ),
    root: str = typer.Option(
        "", help="Where to generate (default: a temp dir, removed afterwards); a dataset kept there is reused."
    ),
    keep: bool = typer.Option(False, help="Keep the generated dataset (in --root)."),
    memory_limit: str = typer.Option("1GB", help="DuckDB memory limit."),
    threads: int = typer.Option(0, help="DuckDB threads (0: up to 4)."),
    arrow: bool = typer.Option(
        False,
        "--arrow",
        help="Scan through the pyarrow dataset (the path s3:// roots take) instead of DuckDB's Parquet reader.",
    ),
) -> None:
    """Generate a statistics dataset shaped like a Pythia-410M run (24 modules x 4,096 neurons per
    snapshot) and aggregate it in a fresh process: rows/s and peak resident memory of the
    monosemantic-ratio pass and of the per-neuron ranking, checked against the known answer.

    Example: [bold]memel bench analyze --full[/bold]
    """
    from memel.benchmarks.analysis_throughput import FULL_SNAPSHOTS, generate, measure

    count = FULL_SNAPSHOTS if full else snapshots
    if count < 1:
        print("error: --snapshots must be >= 1")
        raise typer.Exit(2)
    folder = Path(root) if root else Path(tempfile.mkdtemp(prefix="memel-bench-analyze-"))
    try:
        if any(folder.rglob("*.parquet")):
            size = sum(f.stat().st_size for f in folder.rglob("*.parquet"))
            print(f"reusing the dataset in {folder} ({size / 1e9:.2f} GB; --snapshots/--full ignored)")
        else:
            started = time.perf_counter()
            rows = generate(folder, count)
            generated = time.perf_counter() - started
            size = sum(f.stat().st_size for f in folder.rglob("*.parquet"))
            print(
                f"generated {rows:,} neuron rows ({count} x 24 modules x 4,096 neurons, {size / 1e9:.2f} GB) in {generated:.1f}s"
            )
        m = measure(folder, memory_limit, threads, rank=True, arrow=arrow)
        reader = "pyarrow dataset scanner" if arrow else "DuckDB Parquet reader"
        print(
            f"monosemantic ratio ({reader}): {m.rows:,} rows in {m.seconds:.2f}s = {m.rows_per_s / 1e6:.1f}M rows/s; "
            f"peak RSS {m.peak_rss_bytes / 2**20:,.0f} MiB (after imports {m.baseline_rss_bytes / 2**20:,.0f} MiB); "
            f"{m.groups:,} run x module x step groups"
        )
        if m.rank_seconds is not None:
            print(
                f"per-neuron ranking (ablation's top-k): {m.rank_seconds:.2f}s = {m.rows / m.rank_seconds / 1e6:.1f}M rows/s; peak RSS {m.rank_peak_rss_bytes / 2**20:,.0f} MiB"
            )
        print(f"answers {'match' if m.verified else 'DO NOT match'} the generated ground truth")
        if not m.verified:
            raise typer.Exit(1)
    finally:
        if not keep and not root:
            shutil.rmtree(folder, ignore_errors=True)
