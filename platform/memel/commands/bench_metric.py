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
        0.01, help="MS flags a neuron whose MS exceeds --ms-threshold on this fraction of held-out samples."
    ),
    ms_threshold: float = typer.Option(9.0, help="MS threshold of the flagged criterion (9: three standard deviations)."),
    heldout: int = typer.Option(4096, help="Held-out samples the neurons are judged on."),
    threads: int = typer.Option(1, help="torch CPU threads (0 = torch's default)."),
) -> None:
    """Train a small MLP on planted sparse features and check what the Monosemantic Scale finds:
    precision and recall of the neurons it flags against an AUROC truth that never looks at MS, and
    the False Killing Rate of threshold, per-sample top-n and random selection per inhibition fraction.

    Example: [bold]memel bench metric --steps 400 --hidden 128 --fractions 0.01,0.02,0.03,0.05[/bold]
    """
    import torch

    from memel.benchmarks.metric import bench_metric
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
        f"vs AUROC truth (>= {auroc:g}), seed {seed}"
    )
    for column in ("mode", "truth", "true", "flagged", "both", "precision", "recall", "F1", "base rate", "rank AUROC"):
        flags.add_column(column, justify="right")
    for r in results:
        v = r.validation
        for name, pr, rank in (("specific (any feature)", v.specific, _fmt(v.rank_auroc)), ("single feature", v.single, "")):
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
