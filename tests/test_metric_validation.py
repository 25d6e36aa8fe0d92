"""Metric validation (issue #8, item 3): FKR, precision/recall, best-matching feature and the AUROC
truth on hand-built examples with known answers, then the benchmark end to end at a tiny size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import memel
from memel.benchmarks.metric_validation import (
    bench_metric,
    best_matching_feature,
    false_killing_rate,
    feature_specificity,
    fkr_table,
    flagged,
    fraction_above,
    precision_recall,
    random_false_killing_rate,
    specific_neurons,
    threshold_selection,
    top_n_for,
    top_n_selection,
    validate,
)
from memel.cli import app

# 4 inputs x 2 features: input 0 carries f0, input 1 f1, input 2 both, input 3 none.
FEATURES = np.array([[1, 0], [0, 1], [1, 1], [0, 0]])


def test_false_killing_rate_on_a_hand_built_selection() -> None:
    best = np.array([0, 1, 0])  # neurons 0 and 2 match f0, neuron 1 matches f1
    selected = np.zeros((4, 3), dtype=bool)
    selected[[0, 1, 3], 0] = True  # neuron 0 (f0): input 0 carries f0; inputs 1 and 3 do not -> 2 false kills
    selected[[1, 2], 1] = True  # neuron 1 (f1): inputs 1 and 2 both carry f1 -> 0
    selected[2, 2] = True  # neuron 2 (f0): input 2 carries f0 -> 0
    assert false_killing_rate(selected, FEATURES, best) == pytest.approx(2 / 6)
    # with neuron 0 matched to f1 instead: inputs 0 and 3 lack f1, input 1 carries it -> still 2 of 6,
    # and with neuron 1 matched to f0: input 1 lacks f0 -> 3 of 6
    assert false_killing_rate(selected, FEATURES, np.array([1, 1, 0])) == pytest.approx(2 / 6)
    assert false_killing_rate(selected, FEATURES, np.array([0, 0, 0])) == pytest.approx(3 / 6)
    # uniformly random values: columns carry [1,0,1,0], [0,1,1,0], [1,0,1,0] -> 6 of 12 lack
    assert random_false_killing_rate(FEATURES, best) == pytest.approx(0.5)
    assert math.isnan(false_killing_rate(np.zeros((4, 3), dtype=bool), FEATURES, best))
    with pytest.raises(ValueError, match="best"):
        false_killing_rate(selected, FEATURES, np.array([0, 1]))


def test_threshold_and_top_n_selection_and_the_fkr_table() -> None:
    phi = np.array(
        [
            [9.0, 1.0, 0.5],
            [8.0, 7.0, 0.1],
            [0.2, 6.0, 5.0],
            [4.0, 0.3, 3.0],
        ]
    )
    mask, tau = threshold_selection(phi, 0.25)  # k = round(0.25 * 12) = 3: the values 9, 8, 7
    assert tau == 7.0
    assert sorted(phi[mask].tolist()) == [7.0, 8.0, 9.0]
    top = top_n_selection(phi, 1)  # one value per input: its largest
    assert top.sum() == 4 and np.array_equal(np.argmax(top, 1), [0, 0, 1, 0])
    assert top_n_selection(phi, 2).sum(1).tolist() == [2, 2, 2, 2]
    assert [top_n_for(p, 128) for p in (0.001, 0.01, 0.02, 0.03, 0.05)] == [1, 1, 3, 4, 6]
    best = np.array([0, 1, 0])
    (row,) = fkr_table(phi, FEATURES, best, [0.25])
    # threshold: (0,0) input 0 has f0 ok; (1,0) input 1 lacks f0; (1,1) input 1 has f1 ok -> 1/3
    assert row.threshold_fkr == pytest.approx(1 / 3) and row.tau == 7.0 and row.threshold_share == pytest.approx(0.25)
    # top-n at 25% of 3 neurons: n = 1 -> (0,0) ok, (1,0) lacks f0, (2,1) ok, (3,0) input 3 lacks f0 -> 2/4
    assert row.top_n == 1 and row.top_n_fkr == pytest.approx(0.5)
    assert row.random_fkr == pytest.approx(0.5)


def test_precision_recall_of_known_sets() -> None:
    marked = np.array([1, 1, 1, 0, 0, 0, 1, 0], dtype=bool)
    truth = np.array([1, 1, 0, 1, 0, 0, 0, 0], dtype=bool)
    pr = precision_recall(marked, truth)  # both: neurons 0 and 1
    assert (pr.flagged, pr.truth, pr.true_positives, pr.neurons) == (4, 3, 2, 8)
    assert pr.precision == pytest.approx(0.5) and pr.recall == pytest.approx(2 / 3)
    assert pr.f1 == pytest.approx(4 / 7) and pr.base_rate == pytest.approx(3 / 8)
    empty = precision_recall(np.zeros(8, dtype=bool), truth)
    assert math.isnan(empty.precision) and empty.recall == 0.0 and empty.f1 == 0.0

    above = np.array([0.0, 0.005, 0.01, 0.2, 0.02])
    assert flagged(above, min_fraction=0.01).tolist() == [False, False, True, True, True]
    assert flagged(above, min_fraction=0.0).tolist() == [
        False,
        True,
        True,
        True,
        True,
    ]  # never a neuron with none above
    assert flagged(above, top_fraction=0.4).tolist() == [False, False, False, True, True]
    with pytest.raises(ValueError, match="exactly one"):
        flagged(above)


def test_fraction_above_matches_the_inhibitor_snapshot() -> None:
    torch.manual_seed(0)
    inhibitor = memel.Inhibitor(mode="original").train()
    for _ in range(3):
        inhibitor(torch.randn(256, 16) * torch.linspace(0.5, 2.0, 16))
    x = torch.randn(256, 16).pow(3)  # heavy tails: some values above MS 9 in every neuron
    inhibitor.snapshot()  # reset the window
    phi = inhibitor.monosemantic_scale(x).numpy()  # the statistics the next call judges against
    inhibitor(x)
    expected = inhibitor.snapshot().frac_above.numpy()
    assert expected.sum() > 0
    np.testing.assert_allclose(fraction_above(phi, 9.0), expected, atol=1 / 256 + 1e-6)


def test_best_matching_feature_of_neurons_tied_to_features() -> None:
    # hand-built: inputs 0 and 1 carry f0, input 2 carries f1, input 3 none; f2 is carried by no input.
    # neuron 0: mean over f0 carriers (3+3)/2 = 3 < 4 over f1 (the sum, 6, would pick f0) -> f1;
    # neuron 1: (5+0)/2 = 2.5 > 1 -> f0 (input 3's 9 counts for no feature); f2 is never chosen
    deviation = np.array([[3.0, 5.0], [3.0, 0.0], [4.0, 1.0], [0.0, 9.0]])
    labels = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]])
    assert best_matching_feature(deviation, labels).tolist() == [1, 0]
    # neuron j responds only to feature j (upwards for j < 3, switched off by feature 3)
    rng = np.random.default_rng(0)
    features = (rng.random((2000, 4)) < 0.2).astype(np.int64)
    acts = 0.05 * rng.standard_normal((2000, 4))
    acts[:, :3] += features[:, :3] * rng.uniform(0.5, 1.5, (2000, 3))
    acts[:, 3] += 1.0 - features[:, 3]
    mu, var = acts.mean(0), acts.var(0)
    deviation = (acts - mu) ** 2 / var
    assert best_matching_feature(deviation, features).tolist() == [0, 1, 2, 3]
    # a per-neuron constant in the denominator (phi's eps term) changes nothing
    assert best_matching_feature(deviation * np.array([0.1, 3.0, 7.0, 0.5]), features).tolist() == [0, 1, 2, 3]
    # the values with the largest deviation are the neurons' own features: FKR 0, random about 0.8
    mask, _ = threshold_selection(deviation, 0.05)
    assert false_killing_rate(mask, features, np.arange(4)) == 0.0
    assert random_false_killing_rate(features, np.arange(4)) == pytest.approx(1 - features.mean(), abs=1e-12)
    with pytest.raises(ValueError, match="no input carries"):
        best_matching_feature(deviation, np.zeros_like(features))


def test_auroc_truth_on_synthetic_activations() -> None:
    rng = np.random.default_rng(1)
    n = 1000
    features = (rng.random((n, 3)) < 0.3).astype(np.int64)
    noise = 0.1 * rng.standard_normal((n, 5))
    acts = np.stack(
        [
            features[:, 0] + noise[:, 0],  # tied to f0
            noise[:, 1],  # noise
            np.full(n, 2.0),  # constant (dead)
            -features[:, 1] + noise[:, 3],  # switched off by f1: AUROC near 0, not "specific"
            features[:, 0] + features[:, 1] + noise[:, 4],  # two features: specific, not single
        ],
        axis=1,
    )
    acts[:, 1] = np.round(acts[:, 1], 1)  # ties, handled as scikit-learn does
    auroc = feature_specificity(acts, features)
    expected = np.array([[roc_auc_score(features[:, f], acts[:, h]) for f in range(3)] for h in range(5)])
    np.testing.assert_allclose(auroc, expected, atol=1e-12)
    assert auroc[0, 0] > 0.99 and auroc[3, 1] < 0.01 and np.all(auroc[2] == 0.5)
    assert specific_neurons(auroc, 0.85).tolist() == [True, False, False, False, True]
    assert specific_neurons(auroc, 0.85, single=True).tolist() == [True, False, False, False, False]
    # a feature every input carries has no AUROC and counts for no neuron
    with_constant = np.concatenate([features, np.ones((n, 1), dtype=np.int64)], axis=1)
    auroc = feature_specificity(acts, with_constant)
    assert np.all(np.isnan(auroc[:, 3])) and specific_neurons(auroc, 0.85).tolist() == [True, False, False, False, True]

    # validate(): phi of neurons 0 and 4 is large on their features; flagged = neurons with frac_above >= 1%
    phi = (acts - acts.mean(0)) ** 2 / np.maximum(acts.var(0), 1e-12)
    result = validate(acts, phi, features, fractions=[0.02], min_fraction=0.01)
    assert result.best[0] == 0 and result.best[3] == 1
    assert result.specific.truth == 2 and result.single.truth == 1
    assert 0.0 <= result.rows[0].threshold_fkr < result.rows[0].random_fkr


def test_benchmark_end_to_end_at_a_tiny_size() -> None:
    torch.set_num_threads(1)
    # the ranking claims below are about the tail fraction at MS > 9, which orders neurons; the calibrated
    # criterion (MS > 36 on >= 0.5%) is checked in the next test
    (result,) = bench_metric(
        steps=150, hidden=32, seed=0, heldout_samples=1024, modes=("original",), ms_threshold=9.0, min_fraction=0.01
    )
    v = result.validation
    assert result.mode == "original" and result.heldout_samples == 1024 and result.hidden == 32
    assert result.heldout_loss < 0.1  # learned to read the planted features (chance is about 0.33)
    assert v.frac_above.shape == (32,) and v.auroc.shape == (32, 16) and v.best.shape == (32,)
    assert [row.fraction for row in v.rows] == [0.01, 0.02, 0.03, 0.05]
    for row in v.rows:
        for rate in (row.threshold_fkr, row.top_n_fkr, row.random_fkr):
            assert 0.0 <= rate <= 1.0
        # robust over seeds 0-9 at this size: threshold 0.06-0.30, top-n 0.28-0.47, random 0.89-0.91
        assert row.threshold_fkr < 0.5 * row.random_fkr
        assert row.threshold_fkr < row.top_n_fkr
    # MS ranks the AUROC-specific neurons high (0.83-1.00 over seeds 0-9) and flags them better than chance
    assert v.rank_auroc > 0.7
    assert v.specific.flagged > 0 and v.specific.precision > v.specific.base_rate


@pytest.mark.parametrize("seed", [0, 3])
def test_calibrated_criterion_on_the_trained_planted_mlp(seed: int) -> None:
    torch.set_num_threads(1)
    # sparse features (on in 2% of samples): every flagged neuron is feature-specific (seeds 0-5: 4-6 flagged, precision 1)
    (sparse,) = bench_metric(
        steps=150, hidden=32, seed=seed, heldout_samples=1024, modes=("original",), data={"active_prob": 0.02}
    )
    assert sparse.heldout_loss < 0.05 and sparse.validation.specific.flagged >= 2
    assert sparse.validation.specific.precision == 1.0
    # features on in 10% of samples give MS ~ 9 on them: beyond what MS > 36 can see, so nothing is flagged
    (dense,) = bench_metric(steps=150, hidden=32, seed=seed, heldout_samples=1024, modes=("original",))
    assert dense.validation.specific.flagged == 0


def test_bench_metric_command_prints_the_tables() -> None:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        app,
        [
            "bench",
            "metric",
            "--steps",
            "30",
            "--hidden",
            "16",
            "--heldout",
            "256",
            "--mode",
            "original",
            "--fractions",
            "0.02,0.05",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "precision" in result.output and "False Killing Rate" in result.output and "random FKR" in result.output
    assert "2.0%" in result.output and "5.0%" in result.output
    bad = CliRunner().invoke(app, ["bench", "metric", "--fractions", "0.02,1.5"])
    assert bad.exit_code != 0
