"""The monosemantic ratio against ground truth: its null (featureless neurons) checked by Monte Carlo
and closed forms, about 0 on Gaussian / GELU / ReLU / SiLU neurons through the real Inhibitor, planted
sparse-feature neurons detected, and `memel analyze` end to end on a Parquet dataset of both."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from typer.testing import CliRunner

from memel.analysis.monosemantic_null import false_positive_rate, min_count, min_samples, null_rate, null_tail_rates
from memel.analysis.monosemantic_ratio import Criterion
from memel.benchmarks.monosemanticity import calibrate, featureless_batches, planted_batches
from memel.cli import app

RUNNER = CliRunner(env={"COLUMNS": "200"})


def test_null_tail_rates_match_closed_form_and_monte_carlo() -> None:
    for threshold in (
        9.0,
        36.0,
    ):  # identity: P(|z| > sqrt(T)) exactly; relu: P(z > mu + sqrt(T) sd), closed-form moments
        rates = null_tail_rates(threshold)
        assert rates["identity"] == pytest.approx(2 * stats.norm.sf(math.sqrt(threshold)), rel=1e-5)
        mu, sd = 1 / math.sqrt(2 * math.pi), math.sqrt(0.5 - 1 / (2 * math.pi))
        assert rates["relu"] == pytest.approx(stats.norm.sf(mu + math.sqrt(threshold) * sd), rel=1e-4)
    rng = np.random.default_rng(0)
    z = rng.standard_normal(8_000_000)
    shapes = {"gelu": z * stats.norm.cdf(z), "silu": z / (1 + np.exp(-z))}
    for name, value in shapes.items():  # sample moments and sample tail: independent of the quadrature
        ms = (value - value.mean()) ** 2 / value.var()
        for threshold, tolerance in ((16.0, 0.03), (36.0, 0.15)):
            assert null_tail_rates(threshold)[name] == pytest.approx((ms > threshold).mean(), rel=tolerance)
    assert null_rate(36.0) == pytest.approx(1.28e-4, rel=0.01)  # silu is the heaviest featureless tail at 36
    assert null_rate(9.0) == pytest.approx(0.0186, rel=0.01)  # gelu at 9: above the old 1% criterion


def test_false_positive_rate_and_min_samples_by_brute_force() -> None:
    rate, fraction, alpha = null_rate(36.0), 0.005, 1e-3

    def exact(n: int) -> float:  # P(Binomial(n, rate) >= k) summed term by term
        k = min_count(n, fraction)
        return 1.0 - sum(math.comb(n, i) * rate**i * (1 - rate) ** (n - i) for i in range(k))

    for n in (1, 50, 199, 200, 201, 400, 401, 1000):
        assert false_positive_rate(n, fraction, rate) == pytest.approx(exact(n), rel=1e-6, abs=1e-15)
    needed = min_samples(fraction, rate, alpha)
    counts = np.arange(1, 30_001)
    fp = stats.binom.sf(np.maximum(1, np.ceil(fraction * counts * (1 - 1e-6))) - 1, counts, rate)
    assert needed == 401 and (fp[needed - 1 :] <= alpha).all() and fp[needed - 2] > alpha
    assert min_samples(0.01, null_rate(9.0), alpha) is None  # the old criterion never clears the null
    assert not Criterion(9.0, 0.01).calibrated and Criterion().calibrated


def test_featureless_neurons_are_not_flagged_and_planted_features_are() -> None:
    criterion = Criterion()  # MS > 36 on >= 0.5% of samples, alpha 1e-3
    rows = {
        r.source: r
        for r in calibrate(
            criterion, samples=(2560,), probabilities=(0.02, 0.1), neurons=128, snapshots=2, kernel="eager"
        )
    }
    for shape in ("gaussian", "gelu", "relu", "silu"):
        assert rows[shape].tested and rows[shape].flagged_max == 0.0, (
            shape
        )  # bound: <= 1%; expected 128 * 6e-17 neurons
        assert rows[shape].expected_false_positive < 1e-12
    assert rows["planted p=0.02"].flagged >= 0.95  # MS ~ 49 on the active 2%: every feature neuron found
    assert rows["planted p=0.1"].flagged <= 0.05  # MS ~ 9 on the active 10%: beyond what an MS tail can see


def test_planted_neurons_carry_their_feature() -> None:
    from memel.data.planted import SparseFeatureLoader

    values = next(planted_batches(0.02, 4096, 16, seed=3))
    loader = SparseFeatureLoader(
        4096, num_features=16, input_dim=1024, active_prob=0.02, samples_per_epoch=2**20, seed=3
    )
    features = next(iter(loader)).features.numpy().astype(bool)
    high = values.numpy() > 0.25  # a neuron is high exactly when its own feature is on
    assert (high & features).sum() / high.sum() > 0.99 and (high & features).sum() / features.sum() > 0.99


def _write_snapshots(
    sink: object, run_id: str, context: dict, modules: dict[str, tuple[float, list]], snapshots: int, per: int
) -> None:
    """Feed each module's batch source through a real Inhibitor (ms_threshold 36) and submit its snapshots."""
    import memel
    from memel.stats import snapshot_table

    inhibitors = {name: memel.Inhibitor(mode="original", ms_threshold=36.0, kernel="eager").train() for name in modules}
    for step in range(1, snapshots + 1):
        for name, (depth, sources) in modules.items():
            for _ in range(per):
                inhibitors[name](torch.cat([next(source) for source in sources], dim=1))
            snap = inhibitors[name].snapshot()
            table = snapshot_table(
                snap, run_id=run_id, step=step * per, tokens_seen=step * per * 64, module=name, depth=depth, **context
            )
            sink.submit(table, module=name, step=step * per)


def test_memel_analyze_reports_zero_for_noise_and_finds_planted_neurons(tmp_path: Path) -> None:
    from memel.stats import ParquetStatsSink

    root = tmp_path / "stats"
    base = {"mode": "original", "strength": 1.0, "top_n": 1, "seed": 0}
    with ParquetStatsSink(str(root), "run-noise") as sink:  # featureless neurons only
        modules = {
            "gauss": (0.0, [featureless_batches("gaussian", 64, 64, 1)]),
            "gelu": (0.5, [featureless_batches("gelu", 64, 64, 2)]),
            "relu": (1.0, [featureless_batches("relu", 64, 64, 3)]),
        }
        _write_snapshots(sink, "run-noise", {"model": "noise", "n_params": 1000, **base}, modules, snapshots=2, per=40)
    with ParquetStatsSink(str(root), "run-planted") as sink:  # one module: 32 planted feature neurons + 32 GELU neurons
        modules = {"mixed": (0.0, [planted_batches(0.02, 64, 32, seed=4), featureless_batches("gelu", 64, 32, 5)])}
        _write_snapshots(
            sink, "run-planted", {"model": "planted", "n_params": 2000, **base}, modules, snapshots=2, per=40
        )
    out = tmp_path / "out"
    result = RUNNER.invoke(
        app, ["analyze", str(root), "--threshold", "36", "--out", str(out), "--skip", "ablation,case_study"]
    )
    assert result.exit_code == 0, result.output
    finals = pd.read_csv(out / "ratio_final.csv").set_index("run_id")
    assert finals.loc["run-noise", "ratio"] == 0.0 and finals.loc["run-noise", "p_value"] == 1.0
    assert finals.loc["run-noise", "tested_neurons"] == 192 and finals.loc["run-noise", "samples"] == 2560
    assert 30 / 64 <= finals.loc["run-planted", "ratio"] <= 32 / 64  # the planted half, none of the GELU half
    assert finals.loc["run-planted", "p_value"] < 1e-10
    modules = pd.read_csv(out / "ratio_modules.csv")
    assert modules["tested"].all() and (modules.loc[modules["run_id"] == "run-noise", "mono"] == 0).all()
    table = result.output[result.output.index("Monosemantic ratio at the end of training") :]
    rows = {line.split()[1]: line for line in table.splitlines() if line.startswith("│")}
    assert "0 (n.s.)" in rows["noise"] and rows["noise"].rstrip(" │").endswith("0/1")  # 0, not significant
    assert "(n.s.)" not in rows["planted"] and rows["planted"].rstrip(" │").endswith("1/1")  # its one run significant
    assert "ratio_vs_scale.png" in {p.name for p in out.iterdir()}


def test_sweep_table_reports_the_validated_ratio(tmp_path: Path) -> None:
    from rich.console import Console

    from memel.commands.run import print_sweep
    from memel.orchestration import expand_sweep, load_job
    from memel.orchestration.sweep import SweepResult, add_mono_ratios
    from memel.stats import ParquetStatsSink

    members = expand_sweep(load_job(Path(__file__).resolve().parents[1] / "jobs" / "quickstart.yaml", []))[:3]
    assert {m.spec.inhibition.ms_threshold for m in members} == {36.0}
    root = tmp_path / "stats"
    base = {"mode": "original", "strength": 1.0, "top_n": 1, "seed": 0, "model": "m", "n_params": 1}
    with ParquetStatsSink(str(root), "run-noise") as sink:
        _write_snapshots(
            sink, "run-noise", base, {"gelu": (0.0, [featureless_batches("gelu", 64, 64, 1)])}, snapshots=1, per=40
        )
    with ParquetStatsSink(str(root), "run-planted") as sink:
        modules = {"mixed": (0.0, [planted_batches(0.02, 64, 16, seed=2), featureless_batches("gelu", 64, 48, 3)])}
        _write_snapshots(sink, "run-planted", base, modules, snapshots=1, per=40)
    rows = [
        {"member": m.key, "run_id": run} for m, run in zip(members, ["run-noise", "run-planted", None], strict=True)
    ]
    for row in rows:
        row |= {
            "params": 1,
            "mode": "original",
            "strength": 1.0,
            "top_n": 1,
            "seed": 0,
            "eval_loss": None,
            "eval_metric": None,
            "ms_mean": None,
            "mono_ratio": None,
            "mono_p": None,
            "inhibited": None,
            "wall_s": None,
            "status": "finished",
        }
    criterion = add_mono_ratios(rows, members, str(root))
    assert criterion.startswith("MS > 36 on at least 0.005 of samples; null:")
    assert (rows[0]["mono_ratio"], rows[0]["mono_p"]) == (0.0, 1.0)
    assert 15 / 64 <= rows[1]["mono_ratio"] <= 16 / 64 and rows[1]["mono_p"] < 1e-10 and rows[2]["mono_ratio"] is None
    console = Console(record=True, width=250)
    print_sweep(
        console, SweepResult("quickstart", "p", "file:x", str(root), str(tmp_path), rows, mono_criterion=criterion)
    )
    text = console.export_text()
    lines = {line.split()[1]: line for line in text.splitlines() if line.startswith("│")}
    assert "0 (n.s.)" in lines[members[0].key]  # the noise run: 0, not significant
    assert f"{rows[1]['mono_ratio']:.3g} " in lines[members[1].key] and "(n.s.)" not in lines[members[1].key]
    assert "│ - " in lines[members[2].key] or " - │" in lines[members[2].key]
    assert "mono ratio: MS > 36" in text
    # members that recorded frac_above at MS > 9 get no ratio, and the table says why
    low = [
        m.model_copy(
            update={
                "spec": m.spec.model_copy(
                    update={"inhibition": m.spec.inhibition.model_copy(update={"ms_threshold": 9.0})}
                )
            }
        )
        for m in members
    ]
    fresh = [dict(row, mono_ratio=None, mono_p=None) for row in rows]
    assert (
        add_mono_ratios(fresh, low, str(root)).startswith("monosemantic ratio not measurable")
        and fresh[1]["mono_ratio"] is None
    )


def test_bench_monosemanticity_command() -> None:
    args = [
        "bench",
        "monosemanticity",
        "--samples",
        "640",
        "--probabilities",
        "0.02",
        "--neurons",
        "16",
        "--snapshots",
        "1",
    ]
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.startswith("│")}
    assert set(rows) == {"gaussian", "gelu", "relu", "silu", "planted p=0.02"}
    assert all("0.0000 │" in rows[shape] for shape in ("gaussian", "gelu", "relu", "silu"))
    assert "Example" in RUNNER.invoke(app, ["bench", "monosemanticity", "--help"]).output
    for bad, field in (
        (["--samples", "100"], "samples"),
        (["--probabilities", "0"], "probabilities"),
        (["--alpha", "0"], "--alpha"),
    ):
        wrong = RUNNER.invoke(app, ["bench", "monosemanticity", *bad])
        assert wrong.exit_code == 2 and f"error: {field}" in wrong.output, wrong.output
