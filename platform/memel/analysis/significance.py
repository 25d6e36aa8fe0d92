"""Significance (the paper's Table 9): paired t-tests between original and inhibited runs.

A pair is an ``original`` member and an inhibited member with the same rung (task), seed and
top_n; pairs are pooled across rungs and seeds (and also tested per rung). For each metric
(final held-out loss, final monosemantic ratio, ...) and each inhibited variant:
``t, p = scipy.stats.ttest_rel(inhibited, original)``, so ``t < 0`` means the inhibited runs
have the lower value (a lower loss, or fewer monosemantic neurons).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
from scipy import stats as scipy_stats

from .monosemantic_ratio import add_variant

#: Metrics tested: column of the member table -> what it is.
METRICS = {"eval_loss": "final held-out loss", "mono_ratio": "final monosemantic ratio"}
PAIR_KEYS = ["model", "seed", "top_n"]


def member_table(members: list[Any], finals: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per member: rung, size, mode, strength, top_n, seed, run id, final eval loss (and
    perplexity or accuracy) and final monosemantic ratio (from ``finals``, by run id)."""
    ratio = dict(zip(finals["run_id"], finals["ratio"], strict=True)) if finals is not None and len(finals) else {}
    rows = []
    for m in members:
        metrics = m.metrics or {}
        rows.append({
            "member": m.label, "model": m.rung, "n_params": m.n_params, "label": m.variant or m.mode, "mode": m.mode, "strength": m.strength,
            "top_n": m.top_n, "seed": m.seed, "run_id": m.run_id, "eval_loss": metrics.get("eval/loss", math.nan),
            "eval_metric": metrics.get("eval/perplexity", metrics.get("eval/accuracy", math.nan)),
            "mono_ratio": ratio.get(m.run_id, math.nan),
        })  # fmt: skip
    columns = [
        "member",
        "model",
        "n_params",
        "label",
        "mode",
        "strength",
        "top_n",
        "seed",
        "run_id",
        "eval_loss",
        "eval_metric",
        "mono_ratio",
    ]
    return add_variant(pd.DataFrame(rows, columns=columns))


def paired_test(original: list[float], inhibited: list[float]) -> tuple[float, float]:
    """(t, p) of the two-sided paired t-test of inhibited against original; NaN with fewer than 2 pairs."""
    if len(original) < 2:
        return math.nan, math.nan
    result = scipy_stats.ttest_rel(inhibited, original)
    return float(result.statistic), float(result.pvalue)


def pairs(table: pd.DataFrame, metric: str, variant: str) -> pd.DataFrame:
    """Matched (original, inhibited) values of ``metric`` for one inhibited ``variant``."""
    base = table[table["mode"] == "original"][[*PAIR_KEYS, "n_params", metric]].rename(columns={metric: "original"})
    other = table[table["variant"] == variant][[*PAIR_KEYS, metric]].rename(columns={metric: "inhibited"})
    matched = base.merge(other, on=PAIR_KEYS)
    return matched.dropna(subset=["original", "inhibited"]).sort_values(["n_params", "seed", "top_n"]).reset_index(drop=True)


def significance(table: pd.DataFrame, metrics: dict[str, str] | None = None) -> pd.DataFrame:
    """Per metric, inhibited variant and scope (``all`` rungs pooled, then each rung): pairs,
    means, mean difference (inhibited - original), t and two-sided p."""
    rows = []
    variants = sorted(set(table.loc[table["mode"] != "original", "variant"]))
    for metric, description in (metrics or METRICS).items():
        if metric not in table or table[metric].isna().all():
            continue
        for variant in variants:
            matched = pairs(table, metric, variant)
            scopes = [("all", matched)] + [(model, part) for model, part in matched.groupby("model", sort=False)]
            for scope, part in scopes:
                if scope != "all" and matched["model"].nunique() < 2:
                    continue  # one rung: its row would repeat "all"
                t, p = paired_test(part["original"].tolist(), part["inhibited"].tolist())
                rows.append({
                    "metric": metric, "description": description, "comparison": f"original vs {variant}", "scope": scope,
                    "pairs": len(part), "mean_original": part["original"].mean() if len(part) else math.nan,
                    "mean_inhibited": part["inhibited"].mean() if len(part) else math.nan,
                    "mean_difference": (part["inhibited"] - part["original"]).mean() if len(part) else math.nan, "t": t, "p": p,
                })  # fmt: skip
    columns = [
        "metric",
        "description",
        "comparison",
        "scope",
        "pairs",
        "mean_original",
        "mean_inhibited",
        "mean_difference",
        "t",
        "p",
    ]
    return pd.DataFrame(rows, columns=columns)
