"""``memel analyze``'s pipeline: every computation on a resolved TARGET, then the files and MLflow artifacts."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from memel.errors import ConfigError

from . import plots
from .monosemantic_ratio import VARIANT_KEYS, Criterion, RatioResult, add_variant, analyze_ratio, connect, summarize, top_neurons
from .report import Section, render
from .significance import member_table, significance
from .source import Member, Source

#: Sections that can be left out (the monosemantic ratio, one streaming pass, always runs).
SECTIONS = ("ablation", "case_study", "significance")


@dataclass
class Options:
    """What to compute (see ``memel analyze --help`` for each field)."""

    threshold: float | None = None
    min_fraction: float = 0.01
    depth_bins: int = 5
    top_k: int = 4
    ablation_batches: int = 8
    batch_size: int | None = None
    case_member: str | None = None
    case_seeds: int = 5
    case_lr: float = 1e-3
    case_optimizer: str = "sgd"
    sections: tuple[str, ...] = SECTIONS
    memory_limit: str = "1GB"

    def __post_init__(self) -> None:
        unknown = set(self.sections) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"--skip: unknown section(s) {sorted(unknown)}; allowed: {', '.join(SECTIONS)}")
        for name, value, low in (("--top-k", self.top_k, 1), ("--ablation-batches", self.ablation_batches, 1),
                                 ("--case-seeds", self.case_seeds, 1), ("--depth-bins", self.depth_bins, 1)):  # fmt: skip
            if value < low:
                raise ConfigError(f"{name}: got {value}; must be >= {low}")
        if not (self.case_lr > 0 and math.isfinite(self.case_lr)):
            raise ConfigError(f"--case-lr: got {self.case_lr}; must be a finite number > 0")
        if self.case_optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"--case-optimizer: got {self.case_optimizer!r}; allowed: sgd, adamw")


@dataclass
class Analysis:
    """Everything ``memel analyze`` computed for one TARGET."""

    source: Source
    options: Options
    criterion: Criterion
    ratio: RatioResult | None = None
    members: pd.DataFrame | None = None
    ablation: pd.DataFrame | None = None
    ablation_summary: pd.DataFrame | None = None
    case_study: pd.DataFrame | None = None
    case_summary: pd.DataFrame | None = None
    case_member: str | None = None
    significance: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)


def criterion_for(source: Source, options: Options) -> tuple[Criterion, list[str]]:
    """The criterion, checked against the ``ms_threshold`` the runs recorded ``frac_above`` with."""
    recorded = {m.ms_threshold for m in source.members if m.ms_threshold is not None}
    notes = []
    threshold = options.threshold
    if threshold is None:
        threshold = next(iter(recorded)) if len(recorded) == 1 else 9.0
        if not recorded:
            notes.append(
                "the runs' ms_threshold is unknown (no specs): frac_above is assumed measured against MS > 9, the default"
            )
    criterion = Criterion(threshold, options.min_fraction)
    criterion.check_recorded(recorded)
    return criterion, notes


def _with_members(frame: pd.DataFrame, member: Member) -> pd.DataFrame:
    context = {"member": member.label, "run_id": member.run_id, "model": member.rung, "n_params": member.n_params,
               "label": member.variant or member.mode, "mode": member.mode, "strength": member.strength, "top_n": member.top_n, "seed": member.seed}  # fmt: skip
    return pd.concat([pd.DataFrame([context] * len(frame)), frame.reset_index(drop=True)], axis=1)


def run_ablation(source: Source, options: Options, con: Any, notify: Callable[[str], None]) -> tuple[pd.DataFrame, list[str]]:
    """Figure 2's ablation on every member with a local checkpoint."""
    from .ablation import ablate_member
    from .checkpoint import load_member

    stats = source.stats()
    frames, notes = [], []
    for member in source.members:
        if not member.checkpoint:
            notes.append(f"ablation: {member.label} has no checkpoint; skipped")
            continue
        try:
            notify(f"ablation: {member.label}")
            trained = load_member(member)
            chosen = top_neurons(stats, member.run_id, options.top_k, con)
            if not chosen:
                notes.append(f"ablation: {member.label} has no statistics in the dataset; skipped")
                continue
            result = ablate_member(
                trained, chosen, options.ablation_batches, options.batch_size or trained.spec.train.micro_batch_size
            )
        except (ConfigError, ValueError, OSError, KeyError) as error:
            notes.append(f"ablation: {member.label} skipped: {error}")
            continue
        result.insert(0, "k", options.top_k)
        frames.append(_with_members(result, member))
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), notes


def summarize_ablation(per_member: pd.DataFrame) -> pd.DataFrame:
    """Per rung, variant and group: loss increase over seeds (mean, 95% CI) and the random control's mean."""
    frame = add_variant(per_member)
    keys = [*VARIANT_KEYS, "variant", "group"]
    summary = summarize(frame, keys, "increase", "increase_")
    control = frame.groupby(keys, as_index=False).agg(
        random_increase_mean=("random_increase", "mean"), base_loss_mean=("base_loss", "mean"), items=("items", "sum")
    )
    return summary.merge(control, on=keys).sort_values(["variant", "group", "n_params"]).reset_index(drop=True)


def choose_case_member(source: Source, wanted: str | None) -> Member:
    """``wanted`` (run id or member key), else the largest rung's ``original`` member with the lowest seed."""
    usable = [m for m in source.members if m.checkpoint and m.spec]
    if wanted:
        found = [m for m in source.members if wanted in (m.run_id, m.label)]
        if not found:
            raise ConfigError(f"--case-member: no member {wanted!r}; members: {', '.join(m.label for m in source.members)}")
        if not (found[0].checkpoint and found[0].spec):
            raise ConfigError(f"--case-member: {wanted!r} has no local checkpoint and spec")
        return found[0]
    if not usable:
        raise ConfigError("no member has a local checkpoint and spec")
    original = [m for m in usable if m.mode == "original"] or usable
    return min(original, key=lambda m: (-m.n_params, m.seed, m.run_id))


def run_case_study(source: Source, options: Options) -> tuple[pd.DataFrame, str]:
    """Table 4's procedure on one member, for every mode, over ``case_seeds`` seeds."""
    from .case_study import member_case_study
    from .checkpoint import load_member

    member = choose_case_member(source, options.case_member)
    trained = load_member(member)
    per_seed = member_case_study(
        trained, list(range(options.case_seeds)), options.case_lr, options.case_optimizer, options.batch_size
    )
    return per_seed, member.label


def analyze(source: Source, options: Options, notify: Callable[[str], None] | None = None) -> Analysis:
    """Run the selected sections on ``source``; a section that cannot run leaves a note instead."""
    from .case_study import summarize_case_study

    say = notify or (lambda _: None)
    criterion, notes = criterion_for(source, options)
    result = Analysis(source, options, criterion, notes=notes)
    con = connect(options.memory_limit)
    say("monosemantic ratio: aggregating the statistics")
    labels = {m.run_id: m.variant for m in source.members if m.variant}
    result.ratio = analyze_ratio(source.stats(), criterion, options.depth_bins, con, labels)
    known = {m.run_id for m in source.members}
    extra = [r for r in result.ratio.finals["run_id"] if r not in known]
    if extra:
        result.notes.append(f"{len(extra)} run(s) in the statistics are not members of this sweep: {', '.join(extra[:5])}")
    result.members = member_table(source.members, result.ratio.finals)
    if "ablation" in options.sections:
        ablation, ablation_notes = run_ablation(source, options, con, say)
        result.notes += ablation_notes
        if len(ablation):
            result.ablation = ablation
            result.ablation_summary = summarize_ablation(ablation)
    if "case_study" in options.sections:
        say("case study: one optimizer step per mode")
        try:
            result.case_study, result.case_member = run_case_study(source, options)
            result.case_summary = summarize_case_study(result.case_study)
        except (ConfigError, ValueError, OSError) as error:
            result.notes.append(f"case study skipped: {error}")
    if "significance" in options.sections:
        result.significance = significance(result.members)
        if not len(result.significance):
            result.notes.append("significance: no original/inhibited pairs (same rung, seed and top_n) with values")
    return result


# ---------------------------------------------------------------------------------------- outputs
OUTPUT_TABLES = (
    "members", "ratio_modules", "ratio_runs", "ratio_final", "ratio_by_rung", "ratio_over_steps", "ratio_depth", "ablation",
    "ablation_summary", "case_study", "case_study_summary", "significance",
)  # fmt: skip
OUTPUT_FIGURES = ("ratio_vs_scale", "ratio_over_steps", "depth_heatmap", "ablation_vs_size", "case_study")


def tables(analysis: Analysis) -> dict[str, pd.DataFrame]:
    """Every table by file stem."""
    found: dict[str, pd.DataFrame | None] = {"members": analysis.members}
    if analysis.ratio is not None:
        r = analysis.ratio
        found |= {"ratio_modules": r.modules, "ratio_runs": r.runs, "ratio_final": r.finals, "ratio_by_rung": r.by_rung,
                  "ratio_over_steps": r.over_steps, "ratio_depth": r.depth}  # fmt: skip
    found |= {"ablation": analysis.ablation, "ablation_summary": analysis.ablation_summary, "case_study": analysis.case_study,
              "case_study_summary": analysis.case_summary, "significance": analysis.significance}  # fmt: skip
    return {name: frame for name, frame in found.items() if frame is not None}


def figures(analysis: Analysis) -> dict[str, bytes]:
    """Every figure by file stem."""
    found: dict[str, bytes] = {}
    r = analysis.ratio
    if r is not None and len(r.by_rung):
        found["ratio_vs_scale"] = plots.ratio_vs_scale(r.by_rung, analysis.criterion.describe())
        found["ratio_over_steps"] = plots.ratio_over_steps(r.over_steps)
        found["depth_heatmap"] = plots.depth_heatmap(r.depth, analysis.options.depth_bins)
    if analysis.ablation_summary is not None:
        found["ablation_vs_size"] = plots.ablation_vs_size(analysis.ablation_summary, analysis.options.top_k)
    if analysis.case_summary is not None:
        found["case_study"] = plots.case_study_bars(analysis.case_summary, analysis.case_member or "")
    return found


def sign_pattern(analysis: Analysis) -> dict[str, dict[str, str]]:
    """Per mode: the Decrease Ratio's sign (raw and against original on the same batch) and the paper's."""
    if analysis.case_summary is None:
        return {}
    pattern = {}
    for row in analysis.case_summary.to_dict("records"):
        pattern[row["mode"]] = {"ours": row["sign"], "paper": row["paper_sign"],
                                "ours_vs_original": row.get("vs_original_sign", "?"), "paper_vs_original": row.get("paper_vs_original_sign", "?")}  # fmt: skip
    return pattern


def _case_columns(summary: pd.DataFrame) -> pd.DataFrame:
    columns = ["mode", "seeds", "decrease_ratio", "decrease_ratio_ci_low", "decrease_ratio_ci_high", "vs_original", "vs_original_ci_low",
               "vs_original_ci_high", "total_update_ratio", "update_ratio", "sign", "vs_original_sign", "paper_decrease_ratio",
               "paper_total_update_ratio", "paper_sign", "paper_vs_original_sign"]  # fmt: skip
    return summary[[c for c in columns if c in summary]]


def sections(analysis: Analysis, images: dict[str, bytes]) -> list[Section]:
    """The report's sections."""
    options, criterion = analysis.options, analysis.criterion
    out: list[Section] = []
    r = analysis.ratio
    if r is not None:
        section = Section("1. Monosemantic ratio vs scale", [
            (f"A neuron is monosemantic at a snapshot when {criterion.describe()} since the previous snapshot; the ratio is "
             "the fraction of a run's neurons (all inserted modules) that are. Means and 95% confidence intervals (Student t) over seeds."),
        ])  # fmt: skip
        for name, caption in (("ratio_vs_scale", "Final monosemantic ratio per rung and mode"),
                              ("ratio_over_steps", "Monosemantic ratio over training steps"),
                              ("depth_heatmap", f"Final monosemantic ratio by relative layer depth ({options.depth_bins} bins)")):  # fmt: skip
            if name in images:
                section.figures.append((caption, images[name]))
        section.tables.append(("Final ratio per rung and mode", r.by_rung))
        section.collapsed.append(("Per run, final snapshot", r.finals))
        section.collapsed.append(("Per relative-depth bin", r.depth))
        out.append(section)
    if analysis.ablation_summary is not None:
        section = Section("2. Deactivation ablation (Figure 2)", [
            (f"For each trained member, the {options.top_k} neurons per inserted module with the highest mean frac_above over "
             "the run's snapshots are set to their mean over the held-out batches; the table gives the loss increase per "
             "held-out feature group (all = every sample), with the same number of random neurons per module as a control."),
        ])  # fmt: skip
        if "ablation_vs_size" in images:
            section.figures.append(("Loss increase against model size", images["ablation_vs_size"]))
        section.tables.append(("Loss increase per rung, mode and group (over seeds)", analysis.ablation_summary))
        if analysis.ablation is not None:
            section.collapsed.append(("Per member", analysis.ablation))
        out.append(section)
    if analysis.case_summary is not None:
        pattern = sign_pattern(analysis)
        ours = ", ".join(f"{m} {p['ours']}" for m, p in pattern.items())
        relative = ", ".join(f"{m} {p['ours_vs_original']}" for m, p in pattern.items() if m != "original")
        section = Section("3. Inhibition case study (Table 4)", [
            (f"Member {analysis.case_member}: for each mode, one {options.case_optimizer.upper()} step (lr {options.case_lr:g}) "
             f"with the mode applied, then the same inputs again; {options.case_seeds} seeds (each its own fixed batch)."),
            ("Decrease Ratio = mean over the selected values of (1 - phi(z')/phi(z)) x 100%; Total Update Ratio = mean |z'/z - 1| "
             "x 100% over all values. 'vs original' subtracts original's Decrease Ratio on the same batch and weights."),
            (f"Sign pattern of the Decrease Ratio (parentheses: the 95% CI includes 0): {ours}. Against original: {relative}. "
             "The paper (Swin-B): original +0.003%, naive (a) -0.017%, naive (b) -0.044%, rd +0.013%."),
        ])  # fmt: skip
        if "case_study" in images:
            section.figures.append(("Decrease and update ratios per mode", images["case_study"]))
        section.tables.append(("Per mode, over seeds", _case_columns(analysis.case_summary)))
        if analysis.case_study is not None:
            section.collapsed.append(("Per seed", analysis.case_study))
        out.append(section)
    if analysis.significance is not None and len(analysis.significance):
        out.append(Section("4. Significance (Table 9)", [
            ("Paired t-test (scipy.stats.ttest_rel) of inhibited against original members with the same rung and seed (and "
             "top_n, where the originals vary it), pooled over rungs (scope all) and per rung; t < 0: the inhibited runs have "
             "the lower value. heldout_* metrics are the full held-out set at the end of each run (eval.final: all)."),
            ("Power: detectable_80 is the smallest mean difference this test detects with 80% power (two-sided, alpha 0.05, "
             "the observed spread of the paired differences); power_at_paper is its power to detect the paper's relative "
             "effect of MEmeL-Tune (paper_relative) times the original mean. A non-significant result with low "
             "power_at_paper is inconclusive, not a refutation."),
        ], tables=[("Paired t-tests", analysis.significance)]))  # fmt: skip
    if analysis.members is not None:
        out.append(Section("Members", tables=[("Every member with its final metrics", analysis.members)]))
    if analysis.notes:
        out.append(Section("Notes", list(analysis.notes)))
    return out


def write(analysis: Analysis, out: Path) -> list[Path]:
    """Tables (CSV and Parquet), figures (PNG), ``report.html`` and ``summary.json`` under ``out``
    (outputs of an earlier run that this one does not produce are removed; nothing else is touched)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*(f"{t}.{e}" for t in OUTPUT_TABLES for e in ("csv", "parquet")), *(f"{f}.png" for f in OUTPUT_FIGURES)]:
        (out / stale).unlink(missing_ok=True)
    written = []
    for name, frame in tables(analysis).items():
        frame.to_csv(out / f"{name}.csv", index=False)
        frame.to_parquet(out / f"{name}.parquet", index=False)
        written += [out / f"{name}.csv", out / f"{name}.parquet"]
    images = figures(analysis)
    for name, png in images.items():
        (out / f"{name}.png").write_bytes(png)
        written.append(out / f"{name}.png")
    source = analysis.source
    meta = {"target": source.target, "statistics": source.stats_root, "members": str(len(source.members)),
            "MLflow parent run": f"{source.parent_run_id or '-'} ({source.tracking_uri or 'no tracking store'})",
            "criterion": analysis.criterion.describe()}  # fmt: skip
    (out / "report.html").write_text(render(f"memel analyze: {source.target}", meta, sections(analysis, images)))
    summary = {"target": source.target, "parent_run_id": source.parent_run_id, "stats_root": source.stats_root,
               "criterion": asdict(analysis.criterion), "options": asdict(analysis.options), "case_member": analysis.case_member,
               "sign_pattern": sign_pattern(analysis), "notes": analysis.notes}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return [*written, out / "report.html", out / "summary.json"]


def log_to_mlflow(analysis: Analysis, out: Path, artifact_path: str = "analysis") -> str | None:
    """Log ``out`` as artifacts of the sweep's parent run; returns where, or None without a parent run."""
    source = analysis.source
    if not (source.parent_run_id and source.tracking_uri):
        return None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=source.tracking_uri)
    client.log_artifacts(source.parent_run_id, str(out), artifact_path)
    return f"runs:/{source.parent_run_id}/{artifact_path}"
