"""The report's figures as PNG bytes (matplotlib's object API on the Agg canvas: no global state, no display)."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

COLORS = {"original": "#4c72b0", "rd": "#dd8452", "naive_a": "#55a868", "naive_b": "#c44e52", "l2e": "#8172b3"}


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _color(variant: str, index: int) -> str:
    base = variant.split(" ")[0]
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]
    return COLORS.get(base, palette[index % len(palette)]) if variant == base else palette[index % len(palette)]


def _size_axis(axis, sizes: list[int]) -> None:
    axis.set_xscale("log")
    axis.set_xticks(sizes)
    axis.set_xticklabels([_size(s) for s in sizes])
    axis.minorticks_off()


def _size(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}K"


def _offset(index: int, count: int) -> float:
    """A small multiplicative shift on the log size axis so that variants at one size do not hide each other."""
    return 1.0 + 0.04 * (index - (count - 1) / 2)


def _errors(part: pd.DataFrame, prefix: str) -> np.ndarray:
    mean = part[f"{prefix}mean"].to_numpy(float)
    low = np.nan_to_num(mean - part[f"{prefix}ci_low"].to_numpy(float))
    high = np.nan_to_num(part[f"{prefix}ci_high"].to_numpy(float) - mean)
    return np.vstack([low, high])


def ratio_vs_scale(by_rung: pd.DataFrame, criterion: str) -> bytes:
    """Final monosemantic ratio against parameters, one line per variant (95% CI over seeds); a
    point none of whose runs is significant against the featureless null is drawn hollow, and the
    null ratio (what featureless neurons would show) is the dotted line."""
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axis = figure.subplots()
    measured = by_rung[by_rung["ratio_mean"].notna()]
    groups = list(measured.sort_values("n_params").groupby("variant", sort=True))
    for index, (variant, part) in enumerate(groups):
        color = _color(variant, index)
        x = part["n_params"] * _offset(index, len(groups))
        axis.errorbar(
            x, part["ratio_mean"], yerr=_errors(part, "ratio_"), marker="o", capsize=3, label=variant, color=color
        )
        weak = part["significant_runs"].fillna(0).to_numpy() == 0
        if weak.any():
            axis.plot(x[weak], part["ratio_mean"][weak], "o", markerfacecolor="white", markeredgecolor=color, zorder=3)
    if "null_ratio_max" in measured and measured["null_ratio_max"].notna().any():
        null = measured.groupby("n_params")["null_ratio_max"].max()
        axis.plot(null.index, null.to_numpy(), ":", color="gray", label="featureless null")
    _size_axis(axis, sorted(measured["n_params"].unique()))
    axis.set_xlabel("parameters")
    axis.set_ylabel("monosemantic ratio (end of training)")
    axis.set_title(
        f"Monosemantic neurons vs scale\n({criterion}; bars: 95% CI over seeds; hollow: not significant)", fontsize=10
    )
    axis.grid(alpha=0.3)
    axis.legend(title="mode")
    return _png(figure)


def ratio_over_steps(over_steps: pd.DataFrame) -> bytes:
    """Monosemantic ratio over training steps, one panel per rung, one line per variant."""
    rungs = over_steps.sort_values("n_params")["model"].unique().tolist()
    figure = Figure(figsize=(max(4.0, 3.6 * len(rungs)), 3.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(rungs), sharey=True, squeeze=False)[0])
    for axis, rung in zip(axes, rungs, strict=True):
        part = over_steps[over_steps["model"] == rung]
        for index, (variant, line) in enumerate(part.groupby("variant", sort=True)):
            line = line.sort_values("step")
            color = _color(variant, index)
            axis.plot(line["step"], line["ratio_mean"], marker=".", label=variant, color=color)
            if line["ratio_ci_low"].notna().any():
                axis.fill_between(line["step"], line["ratio_ci_low"], line["ratio_ci_high"], alpha=0.15, color=color)
        axis.set_title(f"{rung} ({_size(int(part['n_params'].iloc[0]))})", fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("monosemantic ratio")
    axes[-1].legend(title="mode", fontsize=8)
    return _png(figure)


def depth_heatmap(depth: pd.DataFrame, bins: int) -> bytes:
    """Final monosemantic ratio per relative-depth bin (rows) and rung (columns), one panel per variant."""
    variants = sorted(depth["variant"].unique())
    rungs = depth.sort_values("n_params")[["model", "n_params"]].drop_duplicates().values.tolist()
    figure = Figure(figsize=(max(4.2, 1.1 * len(rungs) + 1.8) * len(variants), 3.2 + 0.25 * bins), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(variants), sharey=True, squeeze=False)[0])
    top = float(np.nanmax(depth["ratio"])) if len(depth) and depth["ratio"].notna().any() else 1.0
    image = None
    for axis, variant in zip(axes, variants, strict=True):
        grid = np.full((bins, len(rungs)), np.nan)
        for _, row in depth[depth["variant"] == variant].iterrows():
            column = [r[0] for r in rungs].index(row["model"])
            grid[int(row["depth_bin"]), column] = row["ratio"]
        image = axis.imshow(grid, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=max(top, 1e-9))
        for (i, j), value in np.ndenumerate(grid):
            if not math.isnan(value):
                axis.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value < 0.6 * top else "black",
                )
        axis.set_xticks(range(len(rungs)))
        axis.set_xticklabels([f"{m}\n{_size(int(n))}" for m, n in rungs], fontsize=8)
        axis.set_yticks(range(bins))
        axis.set_yticklabels([f"{i / bins:.1f}-{(i + 1) / bins:.1f}" for i in range(bins)], fontsize=8)
        axis.set_title(variant, fontsize=10)
    axes[0].set_ylabel("relative layer depth")
    if image is not None:
        figure.colorbar(image, ax=list(axes), label="monosemantic ratio", shrink=0.85)
    return _png(figure)


def ablation_vs_size(summary: pd.DataFrame, group: str) -> bytes:
    """% loss increase from mean-ablating the probed ``group`` neuron against parameters, on the
    group's tokens and on the other tokens (solid, 95% CI over seeds), with the random-neuron
    control of each (dotted); one panel per variant."""
    summary = summary[summary["group"] != "difference"]
    variants = sorted(summary["variant"].unique())
    figure = Figure(figsize=(5.6 * len(variants), 4.2), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(variants), sharey=True, squeeze=False)[0])
    sizes = sorted(summary["n_params"].unique())
    for axis, variant in zip(axes, variants, strict=True):
        part = summary[summary["variant"] == variant]
        lines = sorted(part.groupby("group", sort=True), key=lambda item: item[0] != group)
        for index, (name, line) in enumerate(lines):
            line = line.sort_values("n_params")
            color = _color(name, index)
            axis.errorbar(
                line["n_params"] * _offset(index, len(lines)),
                line["increase_pct_mean"],
                yerr=_errors(line, "increase_pct_"),
                marker="o",
                capsize=3,
                color=color,
                label=f"{name} tokens, probed neuron",
            )
            axis.plot(
                line["n_params"],
                line["random_increase_pct_mean"],
                ":",
                marker="x",
                color=color,
                label=f"{name} tokens, random neuron",
            )
        _size_axis(axis, sizes)
        axis.axhline(0, color="gray", lw=0.6)
        axis.set_xlabel("parameters")
        axis.set_title(f"trained as {variant}", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[0].set_ylabel(f"% loss increase (best {group!r} neuron set to its mean)")
    return _png(figure)


def case_study_bars(summary: pd.DataFrame, model: str) -> bytes:
    """Decrease Ratio (and minus original's on the same batch), and its quotient by the Total Update
    Ratio, per mode, with 95% CIs over batches."""
    figure = Figure(figsize=(11.0, 3.8), layout="constrained")
    axes = figure.subplots(1, 3)
    modes = summary["mode"].tolist()
    x = np.arange(len(modes))
    colors = [COLORS.get(m, "#8c8c8c") for m in modes]
    panels = [
        ("decrease_ratio", "Decrease Ratio (%)"),
        ("decrease_ratio_vs_original", "Decrease Ratio - original's (%)"),
        ("quotient", "Decrease Ratio / Total Update Ratio"),
    ]
    for axis, (column, title) in zip(axes, panels, strict=True):
        if column not in summary:
            axis.set_visible(False)
            continue
        mean = summary[column].to_numpy(float)
        low = np.nan_to_num(mean - summary[f"{column}_ci_low"].to_numpy(float))
        high = np.nan_to_num(summary[f"{column}_ci_high"].to_numpy(float) - mean)
        axis.bar(x, mean, yerr=np.vstack([low, high]), color=colors, capsize=4)
        axis.axhline(0, color="gray", lw=0.6)
        axis.set_xticks(x)
        axis.set_xticklabels(modes)
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3, axis="y")
    figure.suptitle(f"One optimizer step per mode on {model} (95% CI over batches)", fontsize=10)
    return _png(figure)
