"""memel analyze on hand-built statistics datasets with known answers: monosemantic ratio per run,
step, rung and depth, the ablation's neuron ranking, paired t-tests, TARGET resolution, the
report and the CLI (answers recomputed here with NumPy/SciPy, independently of the SQL)."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from memel.analysis import Criterion, Options, analyze, analyze_ratio, module_steps, resolve, top_neurons, write
from memel.analysis.monosemantic_ratio import depth_bins, ratio_notes
from memel.analysis.significance import member_table, significance
from memel.analysis.source import Member
from memel.cli import app
from memel.errors import ConfigError
from memel.inhibition import Snapshot
from memel.stats import ParquetStatsSink, snapshot_table

RUNNER = CliRunner(env={"COLUMNS": "200"})


def write_run(
    root: Path | str,
    run_id: str,
    context: dict,
    modules: dict[str, float],
    steps: list[int],
    values: dict,
    samples: int = 1000,
) -> None:
    """One run through the real sink: ``values[(module, step)]`` = (frac_above, max_ms) per neuron;
    ``count`` = ``samples`` per step (so a snapshot ``d`` steps after the previous one saw ``d * samples``)."""
    with ParquetStatsSink(str(root), run_id) as sink:
        for module, depth in modules.items():
            for step in steps:
                frac, max_ms = (np.asarray(v, dtype=np.float32) for v in values[(module, step)])
                n = len(frac)
                snap = Snapshot(
                    mean=torch.zeros(n),
                    var=torch.ones(n),
                    count=torch.full((n,), step * samples, dtype=torch.int64),
                    selected_count=torch.zeros(n, dtype=torch.int64),
                    inhibited_count=torch.zeros(n, dtype=torch.int64),
                    max_ms=torch.from_numpy(max_ms),
                    mean_ms=torch.ones(n),
                    frac_above=torch.from_numpy(frac),
                    batches=step,
                    neuron_shape=(n,),
                )
                table = snapshot_table(
                    snap, run_id=run_id, step=step, tokens_seen=step * 100, module=module, depth=depth, **context
                )
                sink.submit(table, module=module, step=step)


def test_hand_written_counts_both_criteria(tmp_path: Path) -> None:
    values = {
        ("mlp.0", 10): ([0.0, 0.02, 0.5, 0.009], [5.0, 45.0, 19.9, 100.0]),
        ("mlp.0", 20): ([0.01, 0.0, 0.0, 0.0], [8.0, 8.0, 50.0, 8.0]),
    }
    context = {"model": "tiny", "n_params": 10, "mode": "original", "strength": 1.0, "top_n": 1, "seed": 0}
    write_run(tmp_path, "run-x", context, {"mlp.0": 0.0}, [10, 20], values)
    frame = module_steps(str(tmp_path), Criterion(36.0, 0.01))
    assert frame["mono"].tolist() == [2, 1] and frame["neurons"].tolist() == [4, 4]  # >= 0.01: {0.02, 0.5}, then {0.01}
    assert frame["tokens_seen"].tolist() == [1000, 2000] and frame["max_ms"].tolist() == pytest.approx([100.0, 50.0])
    assert frame["samples"].tolist() == [10_000, 10_000] and frame["tested"].all()  # count 10,000 then 20,000
    anywhere = module_steps(str(tmp_path), Criterion(40.0, 0.0))
    assert anywhere["mono"].tolist() == [2, 1]  # max_ms > 40: {45, 100}, then {50}
    assert not anywhere["tested"].any()  # any one of 10,000 samples above MS 40: a featureless neuron does it too
    result = analyze_ratio(str(tmp_path), Criterion(36.0, 0.01))
    assert result.finals["ratio"].tolist() == [0.25] and result.finals["step"].tolist() == [20]
    assert result.finals["p_value"].iloc[0] < 1e-6 and result.finals["null_ratio"].iloc[0] < 1e-12
    # MS > 9 does not clear the featureless null (GELU: 1.9% of samples): no ratio, and a note saying so
    low = analyze_ratio(str(tmp_path), Criterion(9.0, 0.01))
    assert low.finals["ratio"].isna().all() and low.by_rung["ratio_mean"].isna().all()
    assert ratio_notes(low)[0].startswith("monosemantic ratio not measurable: a featureless neuron (gelu")


def test_too_few_samples_per_snapshot_are_not_measured(tmp_path: Path) -> None:
    # 20 samples a step: 200 per snapshot, where one sample above MS 36 (rate 1.3e-4) flags a featureless
    # neuron with chance 2.5% > alpha; 2 snapshots 10 steps apart, then one 30 steps later (600 samples)
    values = {("m", s): ([0.01, 0.0], [40.0, 1.0]) for s in (10, 20, 50)}
    context = {"model": "tiny", "n_params": 10, "mode": "rd", "strength": 1.0, "top_n": 1, "seed": 0}
    write_run(tmp_path, "run-few", context, {"m": 0.0}, [10, 20, 50], values, samples=20)
    criterion = Criterion(36.0, 0.005)
    assert criterion.min_samples() == 401
    result = analyze_ratio(str(tmp_path), criterion)
    assert result.modules["samples"].tolist() == [200, 200, 600] and result.modules["tested"].tolist() == [
        False,
        False,
        True,
    ]
    assert np.isnan(result.runs["ratio"].iloc[0]) and result.finals["ratio"].tolist() == [0.5]
    only_early = analyze_ratio(str(tmp_path), criterion, track_every={"run-few": 2})  # a tracker saw half of them
    assert only_early.modules["samples"].tolist() == [100, 100, 300] and only_early.finals["ratio"].isna().all()
    assert "fewer than 401 samples" in ratio_notes(only_early)[0]


# ------------------------------------------------------------------------------ a sweep-shaped dataset
RUNGS = {"small": (100, {"l.0": 0.0, "l.1": 1.0}, 4), "big": (1000, {"l.0": 0.0, "l.1": 0.5, "l.2": 1.0}, 6)}
STEPS = [10, 20, 30]


@pytest.fixture(scope="module")
def sweep_stats(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """2 rungs x {original, rd} x 3 seeds with random frac_above / max_ms; returns the root and the raw values."""
    root = tmp_path_factory.mktemp("stats")
    rng = np.random.default_rng(7)
    raw = {}
    for rung, (n_params, modules, neurons) in RUNGS.items():
        for mode in ("original", "rd"):
            for seed in range(3):
                run_id = f"run-{rung}-{mode}-{seed}"
                values = {}
                for module in modules:
                    for step in STEPS:
                        frac = rng.choice([0.0, 0.004, 0.01, 0.02, 0.3], size=neurons).astype(np.float32)
                        values[(module, step)] = (frac, rng.uniform(1, 40, neurons).astype(np.float32))
                context = {"model": rung, "n_params": n_params, "mode": mode, "strength": 1.0, "top_n": 1, "seed": seed}
                write_run(root, run_id, context, modules, STEPS, values)
                raw[run_id] = (context, values)
    return root, raw


def _expected_ratios(raw: dict, min_fraction: float) -> dict[tuple[str, int], float]:
    expected = {}
    for run_id, (_, values) in raw.items():
        for step in STEPS:
            fracs = [values[(m, s)][0] for (m, s) in values if s == step]
            expected[(run_id, step)] = sum(int((f >= np.float32(min_fraction)).sum()) for f in fracs) / sum(
                len(f) for f in fracs
            )
    return expected


def test_ratio_per_run_step_rung_and_depth_match_numpy(sweep_stats: tuple[Path, dict]) -> None:
    from scipy import stats as st

    root, raw = sweep_stats
    result = analyze_ratio(str(root), Criterion(36.0, 0.01), bins=2)
    expected = _expected_ratios(raw, 0.01)
    got = {(r.run_id, r.step): r.ratio for r in result.runs.itertuples()}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12)
    assert set(result.finals["step"]) == {30} and len(result.finals) == 12
    for row in result.by_rung.itertuples():  # mean, std and Student-t CI over the 3 seeds
        finals = [expected[(f"run-{row.model}-{row.mode}-{s}", 30)] for s in range(3)]
        low, high = st.t.interval(0.95, 2, loc=np.mean(finals), scale=st.sem(finals))
        assert (row.ratio_n, row.ratio_mean, row.ratio_std) == (
            3,
            pytest.approx(np.mean(finals)),
            pytest.approx(np.std(finals, ddof=1)),
        )
        assert (row.ratio_ci_low, row.ratio_ci_high) == (pytest.approx(low), pytest.approx(high))
    steps = result.over_steps.set_index(["model", "mode", "step"])["ratio_mean"]
    for rung in RUNGS:
        for step in STEPS:
            assert steps[(rung, "rd", step)] == pytest.approx(
                np.mean([expected[(f"run-{rung}-rd-{s}", step)] for s in range(3)])
            )
    # depth bins of width 0.5: small has l.0 (0.0) and l.1 (1.0 -> last bin); big has l.0, then l.1 (0.5) and l.2 (1.0) together
    depth = result.depth.set_index(["model", "mode", "depth_bin"])
    for rung, (_, modules, _) in RUNGS.items():
        for bin_index in (0, 1):
            names = [m for m, d in modules.items() if min(int(d * 2), 1) == bin_index]
            fracs = [raw[f"run-{rung}-original-{s}"][1][(m, 30)][0] for s in range(3) for m in names]
            mono = sum(int((f >= np.float32(0.01)).sum()) for f in fracs)
            assert depth.loc[(rung, "original", bin_index), "ratio"] == pytest.approx(mono / sum(len(f) for f in fracs))
            assert depth.loc[(rung, "original", bin_index), "modules"] == len(names)


def test_any_sample_criterion_reads_max_ms(sweep_stats: tuple[Path, dict]) -> None:
    root, raw = sweep_stats
    frame = module_steps(str(root), Criterion(30.0, 0.0))
    for row in frame.itertuples():
        assert row.mono == int((raw[row.run_id][1][(row.module, row.step)][1] > 30.0).sum())


def test_arrow_dataset_and_local_reader_agree(sweep_stats: tuple[Path, dict]) -> None:
    from memel.analysis.source import open_stats

    root, _ = sweep_stats
    local = module_steps(str(root), Criterion()).sort_values(["run_id", "module", "step"]).reset_index(drop=True)
    arrow = (
        module_steps(open_stats(str(root)), Criterion())
        .sort_values(["run_id", "module", "step"])
        .reset_index(drop=True)
    )
    pd.testing.assert_frame_equal(local, arrow, check_dtype=False)


def test_top_neurons_rank_by_mean_frac_above_then_max_ms(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    values = {}
    for module in ("a", "b"):
        for step in (1, 2):
            frac = rng.choice([0.0, 0.1, 0.2], size=8).astype(np.float32)  # many ties, broken by max_ms
            values[(module, step)] = (frac, rng.uniform(0, 50, 8).astype(np.float32))
    context = {"model": "tiny", "n_params": 10, "mode": "rd", "strength": 1.0, "top_n": 1, "seed": 0}
    write_run(tmp_path, "run-t", context, {"a": 0.0, "b": 1.0}, [1, 2], values)
    write_run(tmp_path, "run-other", context, {"a": 0.0}, [1], {("a", 1): (np.ones(8), np.ones(8))})
    got = top_neurons(str(tmp_path), "run-t", 3)
    for module in ("a", "b"):
        mean_frac = (values[(module, 1)][0].astype(np.float64) + values[(module, 2)][0]) / 2
        max_ms = np.maximum(values[(module, 1)][1], values[(module, 2)][1])
        order = np.lexsort((np.arange(8), -max_ms, -mean_frac))
        assert got[module] == order[:3].tolist()
    assert top_neurons(str(tmp_path), "run-missing", 3) == {}


def test_criterion_must_match_the_recorded_threshold() -> None:
    Criterion(9.0, 0.01).check_recorded({9.0})
    Criterion().check_recorded({36.0})
    Criterion(20.0, 0.0).check_recorded({9.0})  # any-sample criterion reads max_ms: any threshold
    with pytest.raises(ConfigError, match="--threshold: got 20.*ms_threshold=9"):
        Criterion(20.0, 0.01).check_recorded({9.0})
    with pytest.raises(ConfigError, match="different ms_threshold"):
        Criterion(9.0, 0.01).check_recorded({9.0, 4.0})
    with pytest.raises(ConfigError, match="--min-fraction"):
        Criterion(9.0, 1.5)
    with pytest.raises(ConfigError, match="--alpha"):
        Criterion(36.0, 0.005, 0.0)
    with pytest.raises(ConfigError, match="--depth-bins"):
        depth_bins(pd.DataFrame(), 0)


# ------------------------------------------------------------------------------ significance
def test_paired_t_tests_match_the_formula() -> None:
    from scipy import stats as st

    rng = np.random.default_rng(11)
    members = []
    for rung, n_params in (("small", 100), ("big", 1000)):
        for seed in range(4):
            base = 3.0 - 0.1 * seed
            members.append(
                Member(f"o-{rung}-{seed}", rung, n_params, "original", 1.0, 1, seed, metrics={"eval/loss": base})
            )
            members.append(
                Member(
                    f"r-{rung}-{seed}",
                    rung,
                    n_params,
                    "rd",
                    1.0,
                    1,
                    seed,
                    metrics={"eval/loss": base - rng.uniform(0, 0.2)},
                )
            )
    members.append(Member("o-lonely", "small", 100, "original", 1.0, 1, 9, metrics={"eval/loss": 5.0}))  # no partner
    table = member_table(members)
    result = significance(table).set_index(["metric", "scope"])
    assert list(result.index.get_level_values("metric").unique()) == ["eval_loss"]  # mono_ratio has no values
    for scope, rungs in (("all", ("small", "big")), ("small", ("small",)), ("big", ("big",))):
        loss = {m.run_id: m.metrics["eval/loss"] for m in members}
        d = np.array([loss[f"r-{r}-{s}"] - loss[f"o-{r}-{s}"] for r in rungs for s in range(4)])
        t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
        p = 2 * st.t.sf(abs(t), len(d) - 1)
        row = result.loc[("eval_loss", scope)]
        assert (row["pairs"], row["t"], row["p"]) == (len(d), pytest.approx(t), pytest.approx(p))
        assert row["mean_difference"] == pytest.approx(d.mean()) and row["comparison"] == "original vs rd"
        assert row["t"] < 0  # the inhibited runs have the lower loss


# ------------------------------------------------------------------------------ TARGET, outputs, CLI
def _fake_sweep(folder: Path, stats_root: Path) -> None:
    """A sweep folder as `memel run` leaves it, around the hand-built statistics (no checkpoints)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.json").write_text(json.dumps({"job": "fake", "parent_run_id": None, "tracking_uri": None}))
    (folder / "stats").symlink_to(stats_root, target_is_directory=True)
    model = {"small": "byte-0.2m", "big": "byte-1m"}
    for run_id in (p.name.removeprefix("run_id=") for p in stats_root.glob("run_id=*")):
        _, rung, mode, seed = run_id.split("-")
        member = folder / "members" / f"{rung}-{mode}-s{seed}"
        member.mkdir(parents=True)
        spec = {
            "name": "fake",
            "model": {"name": model[rung]},
            "inhibition": {"mode": mode, "ms_threshold": 36.0},
            "train": {"seed": int(seed)},
            "data": {"kind": "text_lm", "corpus": "shakespeare", "seq_len": 64},
        }
        (member / "spec.json").write_text(json.dumps(spec))
        (member / "run.json").write_text(json.dumps({"run_id": run_id}))
        loss = 3.1 + 0.01 * int(seed) if mode == "original" else 3.0 + 0.013 * int(seed)  # rd: 0.1 - 0.003 * seed lower
        (member / "summary.json").write_text(
            json.dumps({"run_id": run_id, "checkpoint": None, "metrics": {"eval/loss": loss}})
        )


def test_resolve_targets_and_errors(sweep_stats: tuple[Path, dict], tmp_path: Path) -> None:
    root, raw = sweep_stats
    parquet = resolve(str(root))
    assert parquet.kind == "parquet" and parquet.parent_run_id is None
    assert {(m.run_id, m.rung, m.n_params, m.mode, m.seed) for m in parquet.members} == {
        (r, c["model"], c["n_params"], c["mode"], c["seed"]) for r, (c, _) in raw.items()
    }
    _fake_sweep(tmp_path / "sweep", root)
    swept = resolve(str(tmp_path / "sweep"))
    assert (
        swept.kind == "sweep_dir"
        and len(swept.members) == 12
        and swept.default_out() == (tmp_path / "sweep" / "analysis").resolve()
    )
    assert {m.ms_threshold for m in swept.members} == {36.0} and swept.members[0].metrics["eval/loss"] > 0
    assert resolve(str(tmp_path / "sweep" / "stats")).kind == "sweep_dir"  # a root inside a sweep brings its members
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for target, message in (
        (str(tmp_path / "nowhere"), "TARGET: no such folder"),
        (str(tmp_path / "file.txt"), "TARGET: .* is a file"),
        (str(tmp_path / "empty"), "TARGET: .* is neither a sweep output folder"),
        ("0123456789abcdef0123456789abcdef", "TARGET: .* needs a tracking store"),
    ):
        with pytest.raises(ConfigError, match=message):
            resolve(target, search=tmp_path)
    with pytest.raises(ConfigError, match="TARGET: no MLflow run '0123456789abcdef0123456789abcdef'"):
        resolve("0123456789abcdef0123456789abcdef", tracking_uri=store, search=tmp_path)


def test_report_tables_and_figures_from_statistics_only(sweep_stats: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = sweep_stats
    _fake_sweep(tmp_path / "sweep", root)
    source = resolve(str(tmp_path / "sweep"))
    analysis = analyze(source, Options(depth_bins=2))
    assert analysis.ablation is None and analysis.case_study is None  # no checkpoints: notes instead
    assert any("no checkpoint" in note for note in analysis.notes) and any(
        "case study skipped" in n for n in analysis.notes
    )
    sig = analysis.significance.set_index(["metric", "scope"])
    assert sig.loc[("eval_loss", "all"), "pairs"] == 6 and sig.loc[
        ("eval_loss", "all"), "mean_difference"
    ] == pytest.approx(-0.097)
    assert sig.loc[("mono_ratio", "all"), "pairs"] == 6
    files = write(analysis, tmp_path / "out")
    names = {f.name for f in files}
    assert {
        "ratio_by_rung.csv",
        "ratio_by_rung.parquet",
        "ratio_depth.csv",
        "significance.csv",
        "members.csv",
        "ratio_vs_scale.png",
        "ratio_over_steps.png",
        "depth_heatmap.png",
        "report.html",
        "summary.json",
    } <= names
    assert pd.read_parquet(tmp_path / "out" / "ratio_by_rung.parquet").equals(
        analysis.ratio.by_rung.reset_index(drop=True)
    )
    for png in (tmp_path / "out").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "out" / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) == 3 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)
    assert "http://" not in html and "https://" not in html  # self-contained: nothing fetched
    assert "1. Monosemantic ratio vs scale" in html and "4. Significance (Table 9)" in html


def test_cli_analyze_and_bad_target(sweep_stats: tuple[Path, dict], tmp_path: Path) -> None:
    root, _ = sweep_stats
    result = RUNNER.invoke(
        app, ["analyze", str(root), "--out", str(tmp_path / "out"), "--depth-bins", "2", "--threshold", "36"]
    )
    assert result.exit_code == 0, result.output
    assert "Monosemantic ratio at the end of training" in result.output and "report.html" in result.output
    assert "no parent run known" in result.output and (tmp_path / "out" / "report.html").is_file()
    # no specs: frac_above is taken as recorded at MS > 9, which does not clear the null: no ratio, a note instead
    unknown = RUNNER.invoke(
        app, ["analyze", str(root), "--out", str(tmp_path / "out9"), "--skip", "ablation,case_study"]
    )
    assert unknown.exit_code == 0, unknown.output
    assert "Monosemantic ratio at the end of training" not in unknown.output
    assert (
        "monosemantic ratio not measurable" in unknown.output
        and not (tmp_path / "out9" / "ratio_vs_scale.png").exists()
    )
    bad = RUNNER.invoke(app, ["analyze", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "error:" in bad.output and "TARGET: no such folder" in bad.output
    _fake_sweep(tmp_path / "sweep", root)  # its specs say which ms_threshold frac_above was measured against
    bad = RUNNER.invoke(app, ["analyze", str(tmp_path / "sweep"), "--threshold", "20"])
    assert bad.exit_code == 2 and "--threshold: got 20" in bad.output
    bad = RUNNER.invoke(app, ["analyze", str(root), "--skip", "everything"])
    assert bad.exit_code == 2 and "--skip" in bad.output
    bad = RUNNER.invoke(app, ["analyze", str(root), "--alpha", "2"])
    assert bad.exit_code == 2 and "error: --alpha" in bad.output


def test_bench_analyze_small_dataset_checks_its_answer() -> None:
    result = RUNNER.invoke(app, ["bench", "analyze", "--snapshots", "2"])
    assert result.exit_code == 0, result.output
    assert (
        "196,608 neuron rows (2 x 24 modules" in result.output
        and "rows/s" in result.output
        and "peak RSS" in result.output
    )
    assert "answers match" in result.output


def test_s3_root_gives_the_same_answers(
    sweep_stats: tuple[Path, dict], s3_server: object, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from memel.stats import check_stats_root

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    root, raw = sweep_stats
    s3_root = "s3://memel-analysis/sweep"
    check_stats_root(s3_root)
    chosen = [r for r in raw if r.startswith("run-big")]
    for run_id in chosen:
        context, values = raw[run_id]
        write_run(s3_root, run_id, context, RUNGS["big"][1], STEPS, values)
    source = resolve(s3_root)
    assert source.kind == "parquet" and sorted(m.run_id for m in source.members) == sorted(chosen)
    remote = analyze_ratio(source.stats(), Criterion()).runs.set_index(["run_id", "step"])["ratio"]
    expected = _expected_ratios({r: raw[r] for r in chosen}, 0.01)
    assert remote.to_dict() == pytest.approx(expected)
    assert top_neurons(source.stats(), chosen[0], 2) == top_neurons(str(root), chosen[0], 2)
    result = RUNNER.invoke(app, ["analyze", s3_root, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "ratio_by_rung.csv").is_file()


def test_outputs_name_only_known_files_and_a_rerun_removes_stale_ones(
    sweep_stats: tuple[Path, dict], tmp_path: Path
) -> None:
    from memel.analysis.pipeline import OUTPUT_FIGURES, OUTPUT_TABLES, figures, tables

    root, _ = sweep_stats
    out = tmp_path / "out"
    out.mkdir()
    (out / "ablation.csv").write_text("stale")
    (out / "mine.txt").write_text("keep")
    analysis = analyze(resolve(str(root)), Options(sections=("significance",)))
    assert set(tables(analysis)) <= set(OUTPUT_TABLES) and set(figures(analysis)) <= set(OUTPUT_FIGURES)
    write(analysis, out)
    assert not (out / "ablation.csv").exists() and (out / "mine.txt").read_text() == "keep"


def test_named_sweep_variants_stay_apart(tmp_path: Path) -> None:
    from memel.analysis.source import member_from_spec

    context = {"model": "tiny", "n_params": 10, "mode": "l2e", "strength": 1.0, "top_n": 1, "seed": 0}
    write_run(tmp_path, "run-top", context, {"m": 0.0}, [1], {("m", 1): ([0.5, 0.0], [20.0, 1.0])})
    write_run(tmp_path, "run-thr", context, {"m": 0.0}, [1], {("m", 1): ([0.5, 0.5], [20.0, 20.0])})
    spec = {
        "model": {"name": "byte-0.2m"},
        "inhibition": {"mode": "l2e"},
        "tracking": {"tags": {"memel.variant": "l2e-threshold"}},
    }
    labels = {"run-top": "l2e", "run-thr": member_from_spec("run-thr", spec).variant}
    by_rung = analyze_ratio(str(tmp_path), Criterion(), labels=labels).by_rung.set_index("variant")["ratio_mean"]
    assert by_rung.to_dict() == {"l2e": 0.5, "l2e-threshold": 1.0}
    merged = analyze_ratio(str(tmp_path), Criterion()).by_rung  # without labels both are mode l2e
    assert merged["variant"].tolist() == ["l2e"] and merged["ratio_mean"].tolist() == [0.75]


@pytest.mark.parametrize("command", [["analyze"], ["bench", "analyze"]])
def test_help_has_an_example(command: list[str]) -> None:
    result = RUNNER.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Example" in result.output


def test_a_copied_sweep_folder_never_points_at_the_originals_tracking_store(sweep_stats, tmp_path: Path) -> None:
    """sweep.json records the original folder's SQLite store; a copy uses its own, or none."""
    root, _ = sweep_stats
    original, copy = tmp_path / "original", tmp_path / "copy"
    _fake_sweep(copy, root)
    recorded = f"sqlite:///{(original / 'mlflow.db').resolve()}"
    state = {"job": "fake", "parent_run_id": "abc", "tracking_uri": recorded}
    (copy / "sweep.json").write_text(json.dumps(state))
    assert resolve(str(copy)).tracking_uri is None  # no store of its own: nothing is logged anywhere
    (copy / "mlflow.db").write_bytes(b"")
    assert resolve(str(copy)).tracking_uri == f"sqlite:///{(copy / 'mlflow.db').resolve()}"
    own = f"sqlite:///{(copy / 'mlflow.db').resolve()}"
    (copy / "sweep.json").write_text(json.dumps({**state, "tracking_uri": own}))
    assert resolve(str(copy)).tracking_uri == own
    server = "http://127.0.0.1:5000"
    (copy / "sweep.json").write_text(json.dumps({**state, "tracking_uri": server}))
    assert resolve(str(copy)).tracking_uri == server
