"""Paired t-tests over seeds with CI and power: checked against scipy, Monte Carlo and planted effects."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from memel.analysis.significance import (
    LM_LOSS_RELATIVE,
    PAPER_RELATIVE,
    detectable_effect,
    member_table,
    paired_summary,
    power,
    significance,
)
from memel.analysis.source import Member


def _rejections(effect: float, sd: float, n: int, draws: int, rng: np.random.Generator) -> float:
    """Share of simulated experiments in which scipy's paired t-test rejects at alpha 0.05."""
    base = rng.normal(0.0, 3.0, (draws, n))  # a large seed-to-seed spread, common to both arms of a pair
    inhibited = base + effect + rng.normal(0.0, sd, (draws, n))
    return float((st.ttest_rel(inhibited, base, axis=1).pvalue < 0.05).mean())


def test_t_p_and_ci_match_scipy() -> None:
    rng = np.random.default_rng(3)
    original = rng.normal(0.7, 0.05, 12)
    inhibited = original + rng.normal(0.004, 0.01, 12)
    row = paired_summary(original.tolist(), inhibited.tolist())
    reference = st.ttest_rel(inhibited, original)
    low, high = reference.confidence_interval(0.95)
    assert (row["t"], row["p"]) == (pytest.approx(reference.statistic), pytest.approx(reference.pvalue))
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert row["mean_difference"] == pytest.approx(float((inhibited - original).mean())) and row["pairs"] == 12


def test_power_matches_monte_carlo_and_the_published_value() -> None:
    rng = np.random.default_rng(5)
    # the textbook value for the paired t-test, effect 1 SD, n = 10, alpha = 0.05 two-sided: 0.8031
    assert power(1.0, 1.0, 10) == pytest.approx(0.8031, abs=5e-4)
    for effect, sd, n in ((0.3, 1.0, 10), (0.02, 0.01, 6), (0.5, 1.0, 25)):
        simulated = _rejections(effect, sd, n, 20000, rng)
        assert power(effect, sd, n) == pytest.approx(simulated, abs=4 * math.sqrt(0.25 / 20000))
    assert power(0.0, 1.0, 10) == pytest.approx(0.05)  # no effect: rejections at alpha


def test_detectable_effect_has_80_percent_power() -> None:
    rng = np.random.default_rng(7)
    for sd, n in ((1.0, 10), (0.004, 10), (0.02, 30)):
        mde = detectable_effect(sd, n)
        assert power(mde, sd, n) == pytest.approx(0.8, abs=1e-6)
        assert _rejections(mde, sd, n, 20000, rng) == pytest.approx(0.8, abs=0.015)
    assert detectable_effect(1.0, 40) < detectable_effect(1.0, 10) < detectable_effect(2.0, 10)


def test_a_planted_effect_is_found_and_pure_noise_is_not() -> None:
    rng = np.random.default_rng(11)
    seeds = 10
    base = rng.normal(0.70, 0.03, seeds)  # seed-to-seed spread 10x the effect, shared by each pair
    planted = paired_summary(base.tolist(), (base + 0.01 + rng.normal(0, 0.004, seeds)).tolist(), 0.0113)
    assert planted["p"] < 0.001 and planted["ci_low"] < 0.01 < planted["ci_high"] and planted["ci_low"] > 0
    assert planted["power_at_paper"] > 0.95  # 1.13% of 0.70 = 0.0079, twice the spread of the differences
    draws, rejected, covered = 4000, 0, 0
    for _ in range(draws):
        original = rng.normal(0.70, 0.03, seeds)
        row = paired_summary(original.tolist(), (original + rng.normal(0, 0.004, seeds)).tolist())
        rejected += row["p"] < 0.05
        covered += row["ci_low"] <= 0.0 <= row["ci_high"]
    assert rejected / draws == pytest.approx(0.05, abs=0.012)  # the false-positive rate is alpha
    assert covered / draws == pytest.approx(0.95, abs=0.012)


def _member(mode: str, seed: int, accuracy: float, top_n: int = 1, strength: float = 1.0, variant: str = "") -> Member:
    return Member(
        f"{variant or mode}-{seed}",
        "bert",
        100,
        mode,
        strength,
        top_n,
        seed,
        variant=variant or mode,
        metrics={"heldout/accuracy": accuracy, "heldout/loss": 1 - accuracy, "eval/loss": 1.0},
    )


def test_a_tuned_variant_with_its_own_top_n_pairs_with_the_original_of_its_seed() -> None:
    rng = np.random.default_rng(13)
    base = rng.normal(0.7, 0.03, 10)
    members = [_member("original", s, base[s]) for s in range(10)]
    tuned = [base[s] + 0.01 + rng.normal(0, 0.003) for s in range(10)]
    members += [_member("rd", s, tuned[s], top_n=10, strength=5, variant="rd-tuned") for s in range(10)]
    members += [_member("naive_b", s, base[s] + rng.normal(0, 0.003)) for s in range(10)]
    table = member_table(members)
    result = significance(table).set_index(["metric", "comparison"])
    assert set(table.loc[table["mode"] != "original", "variant"]) == {"rd-tuned n=10", "naive_b n=1"}
    tuned = result.loc[("heldout_accuracy", "original vs rd-tuned n=10")]
    assert tuned["pairs"] == 10 and tuned["p"] < 0.001 and tuned["mean_difference"] == pytest.approx(0.01, abs=0.003)
    assert (
        tuned["paper_relative"] == pytest.approx(PAPER_RELATIVE["heldout_accuracy"])
        and 0 < tuned["power_at_paper"] <= 1
    )
    naive = result.loc[("heldout_accuracy", "original vs naive_b n=1")]
    assert naive["pairs"] == 10 and naive["ci_low"] < 0 < naive["ci_high"]
    assert math.isnan(
        result.loc[("heldout_loss", "original vs naive_b n=1")]["power_at_paper"]
    )  # the paper gives no loss


def test_a_language_model_loss_is_powered_against_the_lm_effect_and_other_kinds_are_not() -> None:
    rng = np.random.default_rng(17)
    base = rng.normal(2.0, 0.02, 6)
    members = [_member("original", s, 1 - base[s]) for s in range(6)]
    members += [_member("rd", s, 1 - base[s] - rng.normal(0, 0.004)) for s in range(6)]
    for member in members:
        member.spec = {"data": {"kind": "text_lm"}}
    row = (
        significance(member_table(members)).set_index(["metric", "comparison"]).loc[("heldout_loss", "original vs rd")]
    )
    sd = float(row["sd_difference"])
    assert row["paper_relative"] == LM_LOSS_RELATIVE == -0.005
    assert row["power_at_paper"] == pytest.approx(power(-0.005 * row["mean_original"], sd, 6))
    members[0].spec = {"data": {"kind": "text_classification"}}  # mixed kinds: no one effect applies
    mixed = significance(member_table(members)).set_index(["metric", "comparison"])
    assert math.isnan(mixed.loc[("heldout_loss", "original vs rd")]["power_at_paper"])
