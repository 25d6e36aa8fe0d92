"""``memel bench metric``: validate the Monosemantic Scale against planted features."""

from __future__ import annotations

import math

import typer
from rich.console import Console
from rich.table import Table

from memel.commands.app import bench_app


def _fractions(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers such as 0.01,0.02, got {text!r}") from None
    if not values or any(not 0.0 < v < 1.0 for v in values):
        raise typer.BadParameter(f"every fraction must be in (0, 1), got {text!r}")
    return values


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


#: ``--mode`` (a module-level default: a list default built in the signature is a shared mutable call).
MODE_OPTION = typer.Option(["original", "rd"], "--mode", help="Inhibition mode during training (repeatable).")


@bench_app.command("metric")
def bench_metric_command(
    steps: int = typer.Option(400, help="Training steps (batch 64) of each model."),
    hidden: int = typer.Option(128, help="Hidden neurons of the MLP (the Inhibitor follows their ReLU)."),
    seed: int = typer.Option(0, help="Seeds the model, the planted features and the data."),
    fractions: str = typer.Option(
        "0.01,0.02,0.03,0.05", help="Inhibition fractions p for the False Killing Rate (comma-separated)."
    ),
    mode: list[str] = MODE_OPTION,
    auroc: float = typer.Option(0.85, help="A neuron is feature-specific when some feature's AUROC reaches this."),
    min_fraction: float = typer.Option(
        0.005, help="MS flags a neuron whose MS exceeds --ms-threshold on this fraction of held-out samples."
    ),
    ms_threshold: float = typer.Option(
        36.0, help="MS threshold of the flagged criterion (36: six standard deviations)."
    ),
    heldout: int = typer.Option(4096, help="Held-out samples the neurons are judged on."),
    active_prob: float = typer.Option(0.1, help="Probability that a planted feature is on in a sample."),
    threads: int = typer.Option(1, help="torch CPU threads (0 = torch's default)."),
) -> None:
    """Train a small MLP on planted sparse features and check what the Monosemantic Scale finds:
    precision and recall of the neurons it flags against an AUROC truth that never looks at MS, and
    the False Killing Rate of threshold, per-sample top-n and random selection per inhibition fraction.

    Example: [bold]memel bench metric --steps 400 --hidden 128 --fractions 0.01,0.02,0.03,0.05[/bold]
    """
    import torch

    from memel.benchmarks.metric_validation import bench_metric
    from memel.errors import ConfigError

    if threads:
        torch.set_num_threads(threads)
    chosen = _fractions(fractions)
    try:
        results = bench_metric(
            steps=steps,
            hidden=hidden,
            seed=seed,
            fractions=chosen,
            modes=tuple(mode),
            auroc_threshold=auroc,
            min_fraction=min_fraction,
            ms_threshold=ms_threshold,
            heldout_samples=heldout,
            data={"active_prob": active_prob},
        )
    except ConfigError as error:
        raise typer.BadParameter(str(error)) from None
    console = Console()
    for r in results:
        console.print(
            f"[bold]{r.mode}[/bold]: {r.steps} steps in {r.train_seconds:.1f} s, train BCE {r.train_loss:.4f}, "
            f"held-out BCE {r.heldout_loss:.4f} on {r.heldout_samples} samples, {r.hidden} neurons ({r.dead} dead)"
        )

    flags = Table(
        title=f"Neurons MS flags (MS > {ms_threshold:g} on >= {min_fraction:g} of held-out samples) "
        f"vs AUROC truth (>= {auroc:g}), features on in {active_prob:g} of samples, seed {seed}"
    )
    for column in ("mode", "truth", "true", "flagged", "both", "precision", "recall", "F1", "base rate", "rank AUROC"):
        flags.add_column(column, justify="right")
    for r in results:
        v = r.validation
        for name, pr, rank in (
            ("specific (any feature)", v.specific, _fmt(v.rank_auroc)),
            ("single feature", v.single, ""),
        ):
            flags.add_row(
                r.mode,
                name,
                str(pr.truth),
                str(pr.flagged),
                str(pr.true_positives),
                _fmt(pr.precision),
                _fmt(pr.recall),
                _fmt(pr.f1),
                _fmt(pr.base_rate),
                rank,
            )
    console.print(flags)

    fkr = Table(title="False Killing Rate: selected values whose input lacks the neuron's best feature")
    for column in ("mode", "fraction p", "tau", "threshold FKR", "top-n (n/H)", "top-n FKR", "random FKR"):
        fkr.add_column(column, justify="right")
    for r in results:
        for row in r.validation.rows:
            fkr.add_row(
                r.mode,
                f"{row.fraction:.1%}",
                f"{row.tau:.2f}",
                _fmt(row.threshold_fkr),
                f"{row.top_n} ({row.top_n_share:.1%})",
                _fmt(row.top_n_fkr),
                _fmt(row.random_fkr),
            )
    console.print(fkr)
    console.print(
        "base rate: the precision of a random flagged set of the same size; rank AUROC: frac_above as a score for the "
        "truth; tau: the (1 - p) quantile of phi over all held-out values (threshold selection); random FKR: the "
        "expected FKR of uniformly random values (any p)."
    )


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers such as 640,2560, got {text!r}") from None


@bench_app.command("monosemanticity")
def bench_monosemanticity_command(
    samples: str = typer.Option(
        "640,2560,10240", help="Samples per statistics snapshot (comma-separated multiples of --batch)."
    ),
    probabilities: str = typer.Option(
        "0.005,0.01,0.02,0.03,0.05,0.1", help="Planted feature probabilities p (comma-separated)."
    ),
    neurons: int = typer.Option(256, help="Neurons per source."),
    snapshots: int = typer.Option(4, help="Snapshots per source and sample count."),
    batch: int = typer.Option(64, help="Samples per batch."),
    threshold: float = typer.Option(36.0, help="MS threshold (the runs' inhibition.ms_threshold)."),
    min_fraction: float = typer.Option(0.005, help="Fraction of samples above the threshold that flags a neuron."),
    alpha: float = typer.Option(1e-3, help="Largest chance that a featureless neuron is flagged."),
    seed: int = typer.Option(0, help="Seeds the noise and the planted features."),
) -> None:
    """Calibrate the monosemantic ratio of [bold]memel analyze[/bold] through the real Inhibitor: the
    fraction of neurons flagged for featureless neurons (Gaussian, GELU, ReLU, SiLU of Gaussian inputs;
    should be about 0) and for neurons carrying one planted sparse feature active on a fraction p of
    samples (detected for p between about 1% and 3%), at several samples per snapshot.

    Example: [bold]memel bench monosemanticity --samples 640,2560,10240[/bold]
    """
    from memel.analysis.monosemantic_ratio import Criterion
    from memel.benchmarks.monosemanticity import calibrate
    from memel.errors import ConfigError

    console = Console()
    try:
        criterion = Criterion(threshold, min_fraction, alpha)
        rows = calibrate(criterion, _ints(samples), _fractions_any(probabilities), neurons, snapshots, batch, seed)
    except ConfigError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
    table = Table(
        title=f"Neurons flagged ({criterion.describe()}), {neurons} per source, {snapshots} snapshots, seed {seed}"
    )
    for column in (
        "source",
        "samples / snapshot",
        "tested",
        "flagged (mean)",
        "flagged (max)",
        "null FP / neuron",
        "s",
    ):
        table.add_column(column, justify="left" if column == "source" else "right")
    for r in rows:
        table.add_row(
            r.source,
            f"{r.samples:,}",
            "yes" if r.tested else "no",
            f"{r.flagged:.4f}",
            f"{r.flagged_max:.4f}",
            f"{r.expected_false_positive:.2g}",
            f"{r.seconds:.1f}",
        )
    console.print(table)
    console.print(f"null: {criterion.null_text()}; tested = a snapshot with that many samples counts in memel analyze.")


def _fractions_any(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated numbers such as 0.01,0.02, got {text!r}") from None
    return values
