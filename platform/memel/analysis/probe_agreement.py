"""Does the monosemantic ratio's flag agree with a sparse probe's selectivity?

Per member, every MLP neuron has two independent labels: its probe AUROC for a token group
(:mod:`.probing`, on held-out text, from the trained checkpoint) and whether the monosemantic
ratio flags it (:mod:`.monosemantic_ratio`: ``frac_above`` at the run's last statistics
snapshot, in module snapshots that are tested against the featureless null). The comparison:

- ``flag_auc``: the probability that a flagged neuron has the higher AUROC than an unflagged one
  (Mann-Whitney U / (flagged x unflagged); 0.5: no relation, 1: every flagged neuron above every
  unflagged one), with the two-sided Mann-Whitney p-value; the same for ``selectivity`` =
  |AUROC - 0.5| x 2 (a neuron selective for the group or for the rest);
- ``enrichment``: among the ``top_fraction`` highest-AUROC neurons, the flagged fraction minus
  the flagged fraction of the rest, with Fisher's exact test of the 2 x 2 table;
- ``best_flagged``: whether the probe's best neuron is flagged.

Across members: the mean of ``flag_auc`` (and of ``enrichment``) with a 95% Student-t CI, over
the members that have both flagged and unflagged neurons. The flag *agrees* with the probe when
the CI of ``flag_auc`` lies above 0.5.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from .monosemantic_ratio import Criterion, Stats, connect, mean_ci, register, unregister

#: The share of highest-AUROC neurons whose flagged fraction ``enrichment`` compares with the rest.
TOP_FRACTION = 0.1
MEASURES = ("auroc", "selectivity")


def neuron_flags(
    stats: Stats, run_id: str, modules: pd.DataFrame, criterion: Criterion, con: object | None = None
) -> pd.DataFrame:
    """``module, neuron, step, frac_above, max_ms, flagged``: every neuron of ``run_id`` at its
    module's last snapshot, for the modules whose last snapshot is tested (``modules``: the
    per-module table of :func:`.monosemantic_ratio.module_steps`)."""
    own = modules[modules["run_id"] == run_id]
    last = own[own["step"] == own.groupby("module")["step"].transform("max")]
    tested = last[last["tested"]]
    columns = ["module", "neuron", "step", "frac_above", "max_ms", "flagged"]
    if not len(tested):
        return pd.DataFrame(columns=columns)
    con = con or connect()
    register(con, stats, "run_stats", run_id)
    try:
        rows = con.execute(
            f"SELECT module, neuron, step, frac_above, max_ms, {criterion.sql()} AS flagged FROM run_stats"
        ).df()
    finally:
        unregister(con, stats, "run_stats")
    wanted = tested[["module", "step"]].astype({"step": "int64"})
    rows = rows.astype({"step": "int64", "neuron": "int64"}).merge(wanted, on=["module", "step"])
    return rows[columns].sort_values(["module", "neuron"]).reset_index(drop=True)


def _flag_auc(scores: np.ndarray, flagged: np.ndarray) -> tuple[float, float]:
    """(U / (n1 n0), two-sided Mann-Whitney p) of ``scores`` of flagged against unflagged neurons."""
    if flagged.all() or not flagged.any():
        return math.nan, math.nan
    test = scipy_stats.mannwhitneyu(scores[flagged], scores[~flagged], alternative="two-sided")
    return float(test.statistic) / (int(flagged.sum()) * int((~flagged).sum())), float(test.pvalue)


def agreement(auroc: np.ndarray, flagged: np.ndarray, top_fraction: float = TOP_FRACTION) -> dict[str, float]:
    """The comparison of one member's neurons (see the module doc): per neuron its AUROC and flag."""
    auroc, flagged = np.asarray(auroc, dtype=float), np.asarray(flagged, dtype=bool)
    if auroc.shape != flagged.shape or auroc.ndim != 1 or not len(auroc):
        raise ValueError(f"auroc and flagged must be 1-D of one non-zero length; got {auroc.shape}, {flagged.shape}")
    if not 0 < top_fraction < 1:
        raise ValueError(f"top_fraction must be in (0, 1); got {top_fraction}")
    out: dict[str, float] = {"neurons": len(auroc), "flagged": int(flagged.sum())}
    for measure, scores in (("auroc", auroc), ("selectivity", 2 * np.abs(auroc - 0.5))):
        out[f"{measure}_flag_auc"], out[f"{measure}_flag_p"] = _flag_auc(scores, flagged)
    out["auroc_flagged_median"] = float(np.median(auroc[flagged])) if flagged.any() else math.nan
    out["auroc_unflagged_median"] = float(np.median(auroc[~flagged])) if (~flagged).any() else math.nan
    top = np.zeros(len(auroc), dtype=bool)
    top[np.argsort(-auroc, kind="stable")[: max(1, math.ceil(top_fraction * len(auroc)))]] = True
    table = [
        [int((flagged & top).sum()), int((~flagged & top).sum())],
        [int((flagged & ~top).sum()), int((~flagged & ~top).sum())],
    ]
    out["top_neurons"] = int(top.sum())
    out["flagged_in_top"] = table[0][0]
    out["enrichment"] = table[0][0] / top.sum() - (table[1][0] / (~top).sum() if (~top).any() else math.nan)
    out["enrichment_p"] = float(scipy_stats.fisher_exact(table).pvalue) if flagged.any() else math.nan
    out["best_flagged"] = bool(flagged[int(np.argmax(auroc))])
    return out


def member_agreement(probe_table: pd.DataFrame, flags: pd.DataFrame, top_fraction: float = TOP_FRACTION) -> dict:
    """:func:`agreement` on the neurons that both the probe (``module, neuron, auroc``) and the flags
    (:func:`neuron_flags`) cover; ``matched`` counts them."""
    both = (
        probe_table[["module", "neuron", "auroc"]]
        .astype({"neuron": "int64"})
        .merge(flags[["module", "neuron", "flagged"]], on=["module", "neuron"])
    )
    if not len(both):
        return {"matched": 0}
    return {"matched": len(both), **agreement(both["auroc"].to_numpy(), both["flagged"].to_numpy(bool), top_fraction)}


def summarize_agreement(per_member: pd.DataFrame) -> pd.DataFrame:
    """Over members, per column (``auroc_flag_auc``, ``selectivity_flag_auc``, ``enrichment``): the
    members with a value, the mean and its 95% Student-t CI, and how many members' own test is
    significant (p < 0.05); ``agrees``: the CI lies above the no-relation value (0.5, or 0)."""
    rows = []
    for column, null, p_column in (
        ("auroc_flag_auc", 0.5, "auroc_flag_p"),
        ("selectivity_flag_auc", 0.5, "selectivity_flag_p"),
        ("enrichment", 0.0, "enrichment_p"),
    ):
        values = per_member[column] if column in per_member else pd.Series(dtype=float)
        mean, std, low, high = mean_ci(values)
        significant = int((per_member[p_column] < 0.05).sum()) if p_column in per_member else 0
        rows.append(
            {
                "measure": column,
                "no_relation": null,
                "members": int(values.notna().sum()),
                "mean": mean,
                "std": std,
                "ci_low": low,
                "ci_high": high,
                "members_significant": significant,
                "agrees": bool(low > null) if not math.isnan(low) else False,
            }
        )
    return pd.DataFrame(rows)
