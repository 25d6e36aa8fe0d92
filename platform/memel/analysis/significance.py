"""Significance (the paper's Table 9): paired t-tests between original and inhibited runs, with power.

A pair is an ``original`` member and an inhibited member with the same rung (task), seed and
top_n; when the sweep has one original per rung and seed (an inhibited variant with its own
top_n, e.g. a tuned one), the pair is the same rung and seed. Pairs are pooled across rungs and
seeds (and also tested per rung). For each metric (the final held-out loss and accuracy over the
FULL held-out set, the periodic evaluation's loss, the final monosemantic ratio) and each
inhibited variant: ``t, p = scipy.stats.ttest_rel(inhibited, original)``, so ``t < 0`` means the
inhibited runs have the lower value, with the mean difference's 95% CI and the test's power:
the smallest difference it detects with 80% power (two-sided, alpha 0.05, the observed spread
of the differences), and its power to detect the paper's relative effect (``PAPER_RELATIVE``; for a
language model's loss, which the paper does not report, ``LM_LOSS_RELATIVE``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize
from scipy import stats as scipy_stats

from .monosemantic_ratio import add_variant

#: Metrics tested: column of the member table -> what it is.
METRICS = {
    "heldout_loss": "loss on the full held-out set at the end",
    "heldout_accuracy": "accuracy on the full held-out set at the end",
    "b_mse": "B-MSE (nowcasting) on the full held-out set at the end",
    "b_mae": "B-MAE (nowcasting) on the full held-out set at the end",
    "eval_loss": "final held-out loss (periodic evaluation's batches)",
    "mono_ratio": "final monosemantic ratio",
}
PAIR_KEYS = ["model", "seed", "top_n"]
#: The paper's relative effects, per metric: GLUE average, MEmeL-Tune against Original (79.6 -> 80.5);
#: HKO-7 with MEmeL from pre-training, P-MEmeL against P-Original (B-MSE 311.54 -> 306.67, B-MAE 1004.25 -> 1000.98).
PAPER_RELATIVE = {"heldout_accuracy": 80.5 / 79.6 - 1, "b_mse": 306.67 / 311.54 - 1, "b_mae": 1000.98 / 1004.25 - 1}
#: The paper reports no language-model loss. For a language model's held-out loss (nats per token) the
#: effect powered against is -0.5%: between HKO-7's pre-training B-MAE gain (-0.33%) and the B-MSE gain on
#: the error's own scale (-1.6% of a squared error, about -0.8% of its root).
LM_LOSS_RELATIVE = -0.005
PAPER_RELATIVE_BY_KIND = {"text_lm": {"heldout_loss": LM_LOSS_RELATIVE, "eval_loss": LM_LOSS_RELATIVE}}
ALPHA, POWER = 0.05, 0.80


def member_table(members: list[Any], finals: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per member: rung, size, data kind, mode, strength, top_n, seed, run id, final eval loss
    (and perplexity or accuracy) and final monosemantic ratio (from ``finals``, by run id)."""
    ratio = dict(zip(finals["run_id"], finals["ratio"], strict=True)) if finals is not None and len(finals) else {}
    rows = []
    for m in members:
        metrics = m.metrics or {}
        rows.append(
            {
                "member": m.label,
                "model": m.rung,
                "n_params": m.n_params,
                "kind": ((m.spec or {}).get("data") or {}).get("kind"),
                "label": m.variant or m.mode,
                "mode": m.mode,
                "strength": m.strength,
                "top_n": m.top_n,
                "seed": m.seed,
                "run_id": m.run_id,
                "eval_loss": metrics.get("eval/loss", math.nan),
                "eval_metric": metrics.get("eval/perplexity", metrics.get("eval/accuracy", math.nan)),
                "heldout_loss": metrics.get("heldout/loss", math.nan),
                "heldout_accuracy": metrics.get("heldout/accuracy", math.nan),
                "b_mse": metrics.get("heldout/b_mse", math.nan),
                "b_mae": metrics.get("heldout/b_mae", math.nan),
                "mono_ratio": ratio.get(m.run_id, math.nan),
            }
        )
    columns = [
        "member",
        "model",
        "n_params",
        "kind",
        "label",
        "mode",
        "strength",
        "top_n",
        "seed",
        "run_id",
        "eval_loss",
        "eval_metric",
        "heldout_loss",
        "heldout_accuracy",
        "b_mse",
        "b_mae",
        "mono_ratio",
    ]
    return add_variant(pd.DataFrame(rows, columns=columns))


def paired_test(original: list[float], inhibited: list[float]) -> tuple[float, float]:
    """(t, p) of the two-sided paired t-test of inhibited against original; NaN with fewer than 2 pairs."""
    if len(original) < 2:
        return math.nan, math.nan
    result = scipy_stats.ttest_rel(inhibited, original)
    return float(result.statistic), float(result.pvalue)


def power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs to detect a true mean difference
    ``effect`` when the differences spread with standard deviation ``sd`` (noncentral t)."""
    if n < 2 or not sd > 0 or not math.isfinite(effect):
        return math.nan
    df, critical = n - 1, scipy_stats.t.ppf(1 - alpha / 2, n - 1)
    shift = abs(effect) * math.sqrt(n) / sd
    toward, away = (float(scipy_stats.nct.sf(critical, df, value)) for value in (shift, -shift))
    return min(1.0, toward + (away if math.isfinite(away) else 0.0))  # far tails can underflow to NaN


def detectable_effect(sd: float, n: int, alpha: float = ALPHA, target: float = POWER) -> float:
    """The smallest mean difference the two-sided paired t-test detects with power ``target``."""
    if n < 2 or not sd > 0:
        return math.nan
    high = sd
    while power(high, sd, n, alpha) < target:
        high *= 2
    return float(optimize.brentq(lambda effect: power(effect, sd, n, alpha) - target, 0.0, high, xtol=sd * 1e-9))


def paired_summary(
    original: list[float], inhibited: list[float], paper_relative: float | None = None
) -> dict[str, float]:
    """Mean difference (inhibited - original) with its 95% CI, t, two-sided p, the difference
    detectable at 80% power, and the power against ``paper_relative`` x the original mean."""
    a, b = np.asarray(original, float), np.asarray(inhibited, float)
    n = len(a)
    diff = b - a
    mean_original = float(a.mean()) if n else math.nan
    mean_difference = float(diff.mean()) if n else math.nan
    sd = float(diff.std(ddof=1)) if n > 1 else math.nan
    t, p = paired_test(a.tolist(), b.tolist())
    half = float(scipy_stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else math.nan
    mde = detectable_effect(sd, n)
    paper_effect = paper_relative * mean_original if paper_relative is not None else math.nan
    return {
        "pairs": n,
        "mean_original": mean_original,
        "mean_inhibited": float(b.mean()) if n else math.nan,
        "mean_difference": mean_difference,
        "ci_low": mean_difference - half,
        "ci_high": mean_difference + half,
        "relative_difference": mean_difference / mean_original if mean_original else math.nan,
        "sd_difference": sd,
        "t": t,
        "p": p,
        "detectable_80": mde,
        "detectable_80_relative": mde / abs(mean_original) if mean_original else math.nan,
        "paper_relative": paper_relative if paper_relative is not None else math.nan,
        "power_at_paper": power(paper_effect, sd, n),
    }


def paper_relative(metric: str, kinds: set[str]) -> float | None:
    """The relative effect ``metric`` is powered against: the paper's, or for members of one data
    kind that has its own (:data:`PAPER_RELATIVE_BY_KIND`), that kind's."""
    if len(kinds) == 1:
        (kind,) = kinds
        if metric in PAPER_RELATIVE_BY_KIND.get(kind, {}):
            return PAPER_RELATIVE_BY_KIND[kind][metric]
    return PAPER_RELATIVE.get(metric)


def pairs(table: pd.DataFrame, metric: str, variant: str) -> pd.DataFrame:
    """Matched (original, inhibited) values of ``metric`` for one inhibited ``variant``: by rung,
    seed and top_n, or by rung and seed when the originals have one top_n per rung and seed."""
    originals = table[table["mode"] == "original"]
    keys = PAIR_KEYS if originals.duplicated(["model", "seed"]).any() else ["model", "seed"]
    base = originals[[*keys, "n_params", metric]].rename(columns={metric: "original"})
    other = table[table["variant"] == variant][[*keys, metric]].rename(columns={metric: "inhibited"})
    matched = base.merge(other, on=keys)
    return matched.dropna(subset=["original", "inhibited"]).sort_values(["n_params", "seed"]).reset_index(drop=True)


def significance(table: pd.DataFrame, metrics: dict[str, str] | None = None) -> pd.DataFrame:
    """Per metric, inhibited variant and scope (``all`` rungs pooled, then each rung): pairs,
    means, mean difference (inhibited - original) with its 95% CI, t, two-sided p and power."""
    rows = []
    variants = sorted(set(table.loc[table["mode"] != "original", "variant"]))
    kinds = set(table["kind"].dropna()) if "kind" in table else set()
    for metric, description in (metrics or METRICS).items():
        if metric not in table or table[metric].isna().all():
            continue
        for variant in variants:
            matched = pairs(table, metric, variant)
            scopes = [("all", matched)] + [(model, part) for model, part in matched.groupby("model", sort=False)]
            for scope, part in scopes:
                if scope != "all" and matched["model"].nunique() < 2:
                    continue  # one rung: its row would repeat "all"
                summary = paired_summary(
                    part["original"].tolist(), part["inhibited"].tolist(), paper_relative(metric, kinds)
                )
                comparison = f"original vs {variant}"
                rows.append(
                    {"metric": metric, "description": description, "comparison": comparison, "scope": scope, **summary}
                )
    return pd.DataFrame(rows, columns=COLUMNS)


COLUMNS = [
    "metric",
    "description",
    "comparison",
    "scope",
    "pairs",
    "mean_original",
    "mean_inhibited",
    "mean_difference",
    "ci_low",
    "ci_high",
    "relative_difference",
    "sd_difference",
    "t",
    "p",
    "detectable_80",
    "detectable_80_relative",
    "paper_relative",
    "power_at_paper",
]
