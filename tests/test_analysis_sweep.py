"""memel analyze end to end on a real quickstart sweep (2 rungs x {original, rd}, a few steps, on a
local Ray instance): TARGET as the MLflow parent run id, every section computed from the real
statistics and ZeRO-2 checkpoints, outputs written and logged to the parent run (about 2-3 min)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from memel.cli import app

RUNNER = CliRunner(env={"COLUMNS": "240"})
JOBS = Path(__file__).resolve().parents[1] / "jobs"
TINY = [
    "--set",
    "train.steps=4",
    "--set",
    "train.log_every=2",
    "--set",
    "eval.every=4",
    "--set",
    "eval.batches=1",
    "--set",
    "stats.every=2",
    "--set",
    "checkpoint.every=4",
    "--set",
    "inhibition.late_start=1",
    "--set",
    "inhibition.forget_steps=2",
    "--set",
    "sweep.rungs=[byte-0.2m, byte-1m]",
]


@pytest.mark.timeout(900)
def test_analyze_a_real_quickstart_sweep_by_parent_run_id(tmp_path: Path) -> None:
    out = tmp_path / "quickstart"
    result = RUNNER.invoke(app, ["run", str(JOBS / "quickstart.yaml"), *TINY, "--set", f"output_dir={out}"])
    assert result.exit_code == 0, result.output
    state = json.loads((out / "sweep.json").read_text())
    report = tmp_path / "report"
    args = [
        "analyze",
        state["parent_run_id"],
        "--tracking-uri",
        state["tracking_uri"],
        "--out",
        str(report),
        "--case-batches",
        "3",
        "--case-lr",
        "run",
        "--ablation-batches",
        "2",
        "--control-draws",
        "2",
        "--probe-group",
        "shakespeare-folio",
    ]
    analyzed = RUNNER.invoke(app, args)
    assert analyzed.exit_code == 0, analyzed.output
    for title in (
        "Monosemantic ratio at the end of training",
        "Mean-ablation of the best-probed 'shakespeare-folio' neuron",
        "Case study on the weights of byte-1m-original (top_ms selection, lr run",
        "Table 4's orderings of the Decrease Ratio",
        "Paired t-tests",
    ):
        assert title in analyzed.output
    assert re.search(r"rd > naive_b .*(reproduced|contradicted|inconclusive)", analyzed.output)

    by_rung = pd.read_csv(report / "ratio_by_rung.csv")
    assert sorted(zip(by_rung["model"], by_rung["mode"])) == [
        ("byte-0.2m", "original"),
        ("byte-0.2m", "rd"),
        ("byte-1m", "original"),
        ("byte-1m", "rd"),
    ]
    assert by_rung["ratio_mean"].between(0, 1).all()
    runs = pd.read_csv(report / "ratio_runs.csv")
    assert (
        sorted(runs["step"].unique()) == [2, 4]
        and (runs.groupby("run_id")["neurons"].first() == runs.groupby("run_id")["neurons"].max()).all()
    )
    assert set(runs.loc[runs["model"] == "byte-1m", "neurons"]) == {5 * 512}  # 5 MLP activations x 512 neurons
    ablation = pd.read_csv(report / "ablation.csv")
    assert len(ablation["run_id"].unique()) == 4 and set(ablation["group"]) == {
        "shakespeare-folio",
        "other",
        "difference",
    }
    groups = ablation[ablation["group"] != "difference"]
    assert groups["base_loss"].between(0.5, 6).all() and groups["ablated_loss"].notna().all()
    assert (
        ablation["auroc"].between(0, 1).all()
        and ablation["neurons"].str.fullmatch(r"layers\.\d+\.mlp\.act\[\d+\]").all()
    )
    assert (ablation["random_draws"] == 2).all() and ablation["increase_pct"].notna().all()
    case = pd.read_csv(report / "case_study.csv")
    shared, own = case[case["variant"] == "shared"], case[case["variant"] == "own"]
    assert len(shared) == 3 * 4 * 2 and shared["update_ratio_all"].gt(0).all()  # batches x modes x (top-MS, random)
    assert sorted(set(own["mode"])) == ["original", "rd"] and len(own) == 3 * 2  # each mode from its own member
    assert (shared.groupby(["selection", "batch"])["selected"].nunique() == 1).all()  # the control modifies as many
    verdicts = pd.read_csv(report / "case_study_verdicts.csv")
    assert {"rd > original", "rd > naive_b"} <= set(verdicts["claim"])
    significance = pd.read_csv(report / "significance.csv")
    assert (
        set(significance["metric"]) == {"eval_loss", "mono_ratio"}
        and (significance["pairs"][significance["scope"] == "all"] == 2).all()
    )
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5

    from mlflow import MlflowClient

    client = MlflowClient(state["tracking_uri"])
    logged = {a.path for a in client.list_artifacts(state["parent_run_id"], "analysis")}
    assert {"analysis/report.html", "analysis/ratio_vs_scale.png", "analysis/significance.csv"} <= logged
