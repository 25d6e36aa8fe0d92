"""The monosemantic ratio's flag against a probe's AUROC, on constructed neurons with a known answer:
values go through a real Inhibitor (ms_threshold 36) into a Parquet statistics dataset, the flags
are read back as `memel analyze` reads them, and the AUROCs come from the probe's own function.
Planted code neurons (shifted on code tokens, with rare large spikes there) must be flagged and
top the AUROC ranking; sparse features unrelated to the labels (pure noise for the probe) must
give no enrichment. The statistics are checked against scikit-learn, SciPy and hand counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from memel.analysis.monosemantic_ratio import Criterion, analyze_ratio, module_steps
from memel.analysis.pipeline import run_probe_agreement
from memel.analysis.probe_agreement import agreement, member_agreement, neuron_flags, summarize_agreement
from memel.analysis.probing import auroc
from memel.analysis.source import Member, Source
from memel.benchmarks.monosemanticity import featureless_batches, planted_batches

BATCH, BATCHES, NOISE, SPARSE = 64, 40, 32, 4
CRITERION = Criterion(threshold=36.0)


def _planted_code(code: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``[batch, SPARSE]``: 1.0 on code tokens plus N(0, 0.3), and a spike of +8 on 2% of the code tokens."""
    shape = (len(code), SPARSE)
    spikes = (torch.rand(shape, generator=generator) < 0.02) & code[:, None]
    return code[:, None].float() + 0.3 * torch.randn(shape, generator=generator) + 8.0 * spikes


def _member(root: Path, run_id: str, seed: int, planted: bool) -> tuple[pd.DataFrame, np.ndarray]:
    """One run's statistics (one module, one snapshot of BATCHES x BATCH tokens) written under ``root``;
    returns its probe table (every neuron's AUROC for code tokens) and the planted neurons' columns."""
    import memel
    from memel.stats import ParquetStatsSink, snapshot_table

    generator = torch.Generator().manual_seed(seed)
    noise = featureless_batches("gelu", BATCH, NOISE, seed)
    sparse = planted_batches(0.015, BATCH, SPARSE, seed + 100)  # sparse features that ignore the labels
    inhibitor = memel.Inhibitor(mode="original", ms_threshold=36.0, kernel="eager").train()
    values, labels = [], []
    for _ in range(BATCHES):
        code = torch.rand(BATCH, generator=generator) < 0.6
        extra = _planted_code(code, generator) if planted else next(sparse)
        batch = torch.cat([next(noise), extra], dim=1)
        inhibitor(batch)
        values.append(batch)
        labels.append(code)
    context = {"model": "m", "n_params": 100, "mode": "original", "strength": 1.0, "top_n": 1, "seed": seed}
    with ParquetStatsSink(str(root), run_id) as sink:
        table = snapshot_table(
            inhibitor.snapshot(),
            run_id=run_id,
            step=BATCHES,
            tokens_seen=BATCHES * BATCH,
            module="mlp.act",
            depth=0.0,
            **context,
        )
        sink.submit(table, module="mlp.act", step=BATCHES)
    scores = auroc(torch.cat(values), torch.cat(labels))
    probe = pd.DataFrame({"module": "mlp.act", "neuron": np.arange(len(scores)), "auroc": scores})
    return probe, np.arange(NOISE, NOISE + SPARSE)


def _flags(root: Path, run_id: str) -> pd.DataFrame:
    modules = module_steps(str(root), CRITERION)
    return neuron_flags(str(root), run_id, modules, CRITERION)


def test_planted_code_neurons_are_flagged_top_the_auroc_and_agree(tmp_path: Path) -> None:
    root = tmp_path / "stats"
    probe, planted = _member(root, "run-code", 0, planted=True)
    flags = _flags(root, "run-code")
    assert len(flags) == NOISE + SPARSE and flags["step"].eq(BATCHES).all()
    assert set(flags.loc[flags["flagged"], "neuron"]) == set(planted)  # the GELU neurons are not flagged
    assert set(probe.nlargest(SPARSE, "auroc")["neuron"]) == set(planted) and probe["auroc"].max() > 0.75
    found = member_agreement(probe, flags)
    assert found["matched"] == NOISE + SPARSE and found["flagged"] == SPARSE
    assert found["auroc_flag_auc"] == 1.0 and found["auroc_flag_p"] < 1e-3
    assert found["best_flagged"] and found["top_neurons"] == SPARSE and found["flagged_in_top"] == SPARSE
    assert found["enrichment"] == 1.0 and found["enrichment_p"] < 1e-4
    source = Source("t", "parquet", str(root), [Member("run-code", "m", 100, "original", 1.0, 1, 0)])
    frame, notes = run_probe_agreement(source, analyze_ratio(str(root), CRITERION), {"run-code": probe}, None)
    assert not notes and frame.loc[0, "auroc_flag_auc"] == 1.0 and frame.loc[0, "snapshot_step"] == BATCHES


def test_sparse_features_unrelated_to_the_labels_give_no_enrichment(tmp_path: Path) -> None:
    root = tmp_path / "stats"
    rows = []
    for seed in range(6):
        probe, sparse = _member(root, f"run-{seed}", seed, planted=False)
        flags = _flags(root, f"run-{seed}")
        assert set(flags.loc[flags["flagged"], "neuron"]) <= set(sparse) and flags["flagged"].sum() >= 2
        rows.append(member_agreement(probe, flags))
    per_member = pd.DataFrame(rows)
    summary = summarize_agreement(per_member).set_index("measure")
    assert not summary["agrees"].any()
    auc = summary.loc["auroc_flag_auc"]
    assert auc["members"] == 6 and auc["ci_low"] < 0.5 < auc["ci_high"]
    assert summary.loc["enrichment", "ci_low"] <= 0 <= summary.loc["enrichment", "ci_high"] or np.isnan(
        summary.loc["enrichment", "ci_low"]
    )


def test_random_flags_and_aurocs_are_rarely_called_related() -> None:
    rng = np.random.default_rng(0)
    p_values = [agreement(rng.normal(0.5, 0.02, 200), rng.random(200) < 0.1)["auroc_flag_p"] for _ in range(400)]
    assert 0.02 <= np.mean(np.array(p_values) < 0.05) <= 0.09


def test_numbers_match_scikit_learn_scipy_and_hand_counts() -> None:
    rng = np.random.default_rng(1)
    scores = rng.random(50)
    flagged = rng.random(50) < 0.3
    found = agreement(scores, flagged, top_fraction=0.2)
    assert found["auroc_flag_auc"] == pytest.approx(roc_auc_score(flagged, scores))
    selective = 2 * np.abs(scores - 0.5)
    assert found["selectivity_flag_auc"] == pytest.approx(roc_auc_score(flagged, selective))
    top = np.argsort(-scores)[:10]
    in_top = np.isin(np.arange(50), top)
    assert found["flagged_in_top"] == int(flagged[top].sum())
    assert found["enrichment"] == pytest.approx(flagged[in_top].mean() - flagged[~in_top].mean())
    table = [
        [(flagged & in_top).sum(), (~flagged & in_top).sum()],
        [(flagged & ~in_top).sum(), (~flagged & ~in_top).sum()],
    ]
    assert found["enrichment_p"] == pytest.approx(stats.fisher_exact(table).pvalue)
    assert found["best_flagged"] == bool(flagged[np.argmax(scores)])
    per_member = pd.DataFrame([agreement(rng.random(40), rng.random(40) < 0.3) for _ in range(5)])
    row = summarize_agreement(per_member).set_index("measure").loc["auroc_flag_auc"]
    values = per_member["auroc_flag_auc"].to_numpy()
    half = stats.t.ppf(0.975, 4) * values.std(ddof=1) / np.sqrt(5)
    assert row["mean"] == pytest.approx(values.mean()) and row["ci_low"] == pytest.approx(values.mean() - half)


def test_no_flagged_neuron_leaves_the_relation_undefined_and_bad_input_is_refused() -> None:
    found = agreement(np.linspace(0.4, 0.6, 20), np.zeros(20, dtype=bool))
    assert np.isnan(found["auroc_flag_auc"]) and found["flagged"] == 0 and not found["best_flagged"]
    with pytest.raises(ValueError, match="one non-zero length"):
        agreement(np.ones(3), np.ones(4, dtype=bool))
    with pytest.raises(ValueError, match="top_fraction"):
        agreement(np.ones(3), np.ones(3, dtype=bool), top_fraction=1.0)
