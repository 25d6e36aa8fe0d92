"""``memel analyze``'s pipeline: every computation on a resolved TARGET, then the files and MLflow artifacts."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memel.errors import ConfigError

from . import plots
from .monosemantic_ratio import (
    RECOMMENDED_THRESHOLD,
    RUN_LEVEL,
    VARIANT_KEYS,
    Criterion,
    RatioResult,
    add_variant,
    analyze_ratio,
    connect,
    ratio_notes,
    summarize,
)
from .probe_agreement import member_agreement, neuron_flags, summarize_agreement
from .report import Section, render
from .significance import member_table, significance
from .source import Member, Source

#: Held-out batches each retained checkpoint is scored on for the convergence curve.
CURVE_BATCHES = 8

#: Sections that can be left out (the monosemantic ratio, one streaming pass, always runs).
SECTIONS = ("ablation", "case_study", "significance")


@dataclass
class Options:
    """What to compute (see ``memel analyze --help`` for each field)."""

    threshold: float | None = None
    min_fraction: float = 0.005
    alpha: float = 1e-3
    depth_bins: int = 5
    probe_group: str = "python-code"
    probe_neurons: int = 1
    control_draws: int = 8
    ablation_batches: int = 16
    batch_size: int | None = None
    case_member: str | None = None
    case_batches: int = 50
    case_lrs: tuple[str, ...] = ("run", "2e-06")
    case_optimizer: str = "run"
    case_random: bool = True
    case_own: bool = True
    sections: tuple[str, ...] = SECTIONS
    memory_limit: str = "1GB"
    flat_tail: float = 0.25
    flat_threshold: float = 0.05

    def __post_init__(self) -> None:
        unknown = set(self.sections) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"--skip: unknown section(s) {sorted(unknown)}; allowed: {', '.join(SECTIONS)}")
        if not self.probe_group.strip():
            raise ConfigError("--probe-group: empty; give a document label of the held-out data, e.g. python-code")
        for name, value, low in (
            ("--probe-neurons", self.probe_neurons, 1),
            ("--ablation-batches", self.ablation_batches, 2),
            ("--control-draws", self.control_draws, 2),
            ("--case-batches", self.case_batches, 2),
            ("--depth-bins", self.depth_bins, 1),
        ):
            if value < low:
                raise ConfigError(f"{name}: got {value}; must be >= {low}")
        if not 0 < self.flat_tail <= 1:
            raise ConfigError(f"--flat-tail: got {self.flat_tail}; must be in (0, 1] (the last fraction of training)")
        if not self.flat_threshold > 0:
            raise ConfigError(f"--flat-threshold: got {self.flat_threshold}; must be > 0")
        if not self.case_lrs:
            raise ConfigError(
                "--case-lr: give at least one: run (the member's last learning rate) or a number such as 2e-6"
            )
        for value in self.case_lrs:
            try:
                rate = None if value == "run" else float(value)
            except ValueError:
                rate = math.nan
            if rate is not None and not (rate > 0 and math.isfinite(rate)):
                raise ConfigError(
                    f"--case-lr: got {value!r}; allowed: run (the member's last learning rate) or a finite number > 0"
                )
        if self.case_optimizer not in ("run", "sgd"):
            raise ConfigError(
                f"--case-optimizer: got {self.case_optimizer!r}; allowed: run (the member's AdamW and its state), sgd"
            )


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
    case_verdicts: pd.DataFrame | None = None
    case_member: str | None = None
    case_step: int | None = None
    significance: pd.DataFrame | None = None
    convergence: pd.DataFrame | None = None
    probe_agreement: pd.DataFrame | None = None
    probe_agreement_summary: pd.DataFrame | None = None
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
                "the runs' ms_threshold is unknown (no specs): frac_above is assumed measured against MS > 9, the default; "
                "give --threshold if the runs recorded another"
            )
    criterion = Criterion(threshold, options.min_fraction, options.alpha)
    criterion.check_recorded(recorded)
    return criterion, notes


def _with_members(frame: pd.DataFrame, member: Member) -> pd.DataFrame:
    context = {
        "member": member.label,
        "run_id": member.run_id,
        "model": member.rung,
        "n_params": member.n_params,
        "label": member.variant or member.mode,
        "mode": member.mode,
        "strength": member.strength,
        "top_n": member.top_n,
        "seed": member.seed,
    }
    return pd.concat([pd.DataFrame([context] * len(frame)), frame.reset_index(drop=True)], axis=1)


def run_ablation(
    source: Source, options: Options, notify: Callable[[str], None]
) -> tuple[pd.DataFrame, list[str], dict[str, pd.DataFrame]]:
    """Figure 2 by probing (:mod:`.ablation`) on every text-LM member with a local checkpoint:
    the per-member rows, notes, and each member's probe table (every neuron's AUROC) by run id."""
    from .ablation import ablate_member
    from .checkpoint import load_member

    frames, notes, probes = [], [], {}
    for member in source.members:
        if not member.checkpoint:
            notes.append(f"ablation: {member.label} has no checkpoint; skipped")
            continue
        kind = ((member.spec or {}).get("data") or {}).get("kind", "text_lm")
        if kind != "text_lm":
            notes.append(
                f"ablation: {member.label} is trained on {kind!r} data; the probing ablation needs text_lm tokens; skipped"
            )
            continue
        try:
            notify(f"ablation: {member.label}: probing for {options.probe_group!r} tokens")
            trained = load_member(member)
            result = ablate_member(
                trained,
                options.probe_group,
                options.ablation_batches,
                options.batch_size or trained.spec.train.micro_batch_size,
                options.probe_neurons,
                options.control_draws,
            )
        except (ConfigError, ValueError, OSError, KeyError) as error:
            notes.append(f"ablation: {member.label} skipped: {error}")
            continue
        rows = result.rows
        rows.insert(0, "step", trained.step)
        frames.append(_with_members(rows, member))
        probes[member.run_id] = result.probe.table
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), notes, probes


def run_probe_agreement(
    source: Source, ratio: RatioResult, probes: dict[str, pd.DataFrame], con: Any
) -> tuple[pd.DataFrame, list[str]]:
    """Per member with a probe table: the ratio's flags against the probe's AUROCs (:mod:`.probe_agreement`)."""
    rows, notes = [], []
    for member in source.members:
        if member.run_id not in probes:
            continue
        flags = neuron_flags(source.stats(), member.run_id, ratio.modules, ratio.criterion, con)
        found = member_agreement(probes[member.run_id], flags)
        if not found.get("matched"):
            notes.append(
                f"ratio vs probe: {member.label} has no tested statistics snapshot of the probed neurons; skipped"
            )
            continue
        step = int(flags["step"].max())
        rows.append({**_member_columns(member), "snapshot_step": step, **found})
    return pd.DataFrame(rows), notes


def _member_columns(member: Member) -> dict[str, Any]:
    """The columns that name a member in a per-member table."""
    return {
        "member": member.label,
        "run_id": member.run_id,
        "model": member.rung,
        "n_params": member.n_params,
        "seed": member.seed,
    }


def member_curve(member: Member, options: Options, client: Any) -> tuple[str, list[int], list[float]]:
    """The member's held-out loss curve: on one fixed held-out sample from its retained checkpoints
    (:mod:`.checkpoint_curve`) where it kept at least :data:`.convergence.MIN_TAIL_POINTS`, else its
    periodic ``eval/loss`` from the tracking store (``client``; None: none)."""
    from .checkpoint_curve import checkpoint_losses
    from .convergence import MIN_TAIL_POINTS

    steps, losses = checkpoint_losses(member, CURVE_BATCHES, options.batch_size)
    if len(steps) >= MIN_TAIL_POINTS:
        return "checkpoints", steps, losses
    if client is None:
        return "", [], []
    history = client.get_metric_history(member.run_id, "eval/loss")
    return "eval/loss", [h.step for h in history], [h.value for h in history]


def run_convergence(source: Source, options: Options) -> tuple[pd.DataFrame, list[str]]:
    """Per member: whether its held-out loss flattened (:func:`member_curve`, then
    :func:`.convergence.loss_flattened` with the options' tail and threshold)."""
    from .convergence import loss_flattened

    client = None
    if source.tracking_uri:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=source.tracking_uri)
    rows, notes = [], []
    unjudged: dict[str, list[str]] = {}  # why a member's curve could not be judged -> the members
    for member in source.members:
        try:
            curve, steps, losses = member_curve(member, options, client)
            if not steps:
                continue
            result = loss_flattened(steps, losses, options.flat_tail, options.flat_threshold)
        except (ConfigError, ValueError, OSError, KeyError) as error:
            unjudged.setdefault(str(error), []).append(member.label)
            continue
        except Exception as error:  # noqa: BLE001 - a member missing from the tracking store only means less to report
            unjudged.setdefault(f"no loss curve ({type(error).__name__}: {error})", []).append(member.label)
            continue
        rows.append(
            {
                **_member_columns(member),
                "curve": curve,
                "points": len(steps),
                "first_loss": float(losses[int(np.argmin(steps))]),
                "last_loss": float(losses[int(np.argmax(steps))]),
                **asdict(result),
            }
        )
    for reason, labels in unjudged.items():  # one note per reason, however many members share it
        named = ", ".join(labels[:4]) + (f" and {len(labels) - 4} more" if len(labels) > 4 else "")
        notes.append(
            f"convergence: {named}: {reason}"
            if len(labels) == 1
            else f"convergence: {len(labels)} members ({named}): {reason}"
        )
    frame = pd.DataFrame(rows)
    if len(frame) and not frame["flattened"].all():
        still = frame.loc[~frame["flattened"], "member"].tolist()
        notes.append(
            f"convergence: {len(still)} of {len(frame)} members' held-out loss has not flattened (the last "
            f"{options.flat_tail:.0%} of training gained >= {options.flat_threshold:.0%} of the total drop): {', '.join(still[:6])}"
        )
    if len(frame) and (frame["curve"] == "eval/loss").any():
        notes.append(
            "convergence: members with fewer than 3 retained checkpoints are judged on their periodic eval/loss, which reads "
            "other held-out files at each evaluation (keep more checkpoints, checkpoint.keep, for a fixed-sample curve)"
        )
    return frame, notes


def summarize_ablation(per_member: pd.DataFrame) -> pd.DataFrame:
    """Per rung, variant and group, over seeds: the probed neurons' % loss increase, the random
    control's (each member's mean over its draws), the excess of the first over the second, each
    with a 95% CI; the mean AUROC and spread of the control's draws; and per variant and group the
    size trend of the increase and of the excess (:func:`size_trend`)."""
    frame = add_variant(per_member)
    frame["excess_pct"] = frame["increase_pct"] - frame["random_increase_pct_mean"]
    keys = [*VARIANT_KEYS, "variant", "group"]
    merged = summarize(frame, keys, "increase_pct", "increase_pct_")
    for column, prefix in (("random_increase_pct_mean", "random_increase_pct_"), ("excess_pct", "excess_pct_")):
        merged = merged.merge(summarize(frame, keys, column, prefix).drop(columns=[f"{prefix}n"]), on=keys)
    extra = frame.groupby(keys, as_index=False).agg(
        auroc_mean=("auroc", "mean"),
        random_draw_std_mean=("random_increase_pct_std", "mean"),
        base_loss_mean=("base_loss", "mean"),
        tokens=("tokens", "sum"),
    )
    merged = merged.merge(extra, on=keys)
    merged = merged.merge(size_trend(frame, "increase_pct", "trend_"), on=["variant", "group"], how="left")
    merged = merged.merge(size_trend(frame, "excess_pct", "excess_trend_"), on=["variant", "group"], how="left")
    return merged.sort_values(["variant", "group", "n_params"]).reset_index(drop=True)


def size_trend(frame: pd.DataFrame, column: str, prefix: str) -> pd.DataFrame:
    """Per variant and group: the least-squares slope of the members' ``column`` against log10(parameters)
    (per tenfold size; < 0: it shrinks with scale), its 95% CI and p-value (scipy.stats.linregress)."""
    from scipy import stats as scipy_stats

    names = [f"{prefix}{n}" for n in ("slope", "ci_low", "ci_high", "p")]
    rows = []
    for (variant, group), part in frame.groupby(["variant", "group"], sort=True):
        part = part.dropna(subset=[column])
        values = [math.nan] * 4
        if part["n_params"].nunique() >= 2 and len(part) >= 3:
            fit = scipy_stats.linregress(np.log10(part["n_params"].to_numpy(float)), part[column].to_numpy(float))
            half = float(scipy_stats.t.ppf(0.975, len(part) - 2)) * fit.stderr
            values = [fit.slope, fit.slope - half, fit.slope + half, fit.pvalue]
        rows.append({"variant": variant, "group": group, **dict(zip(names, values, strict=True))})
    return pd.DataFrame(rows, columns=["variant", "group", *names])


def run_case_study(source: Source, options: Options, say: Callable[[str], None]) -> Any:
    """Table 4's procedure (see :mod:`.case_run`) with the options' batches, learning rates and variants."""
    from .case_run import run_case

    return run_case(
        source,
        options.case_member,
        options.case_batches,
        options.case_lrs,
        options.case_random,
        options.case_own,
        options.case_optimizer,
        options.batch_size,
        say,
    )


def analyze(source: Source, options: Options, notify: Callable[[str], None] | None = None) -> Analysis:
    """Run the selected sections on ``source``; a section that cannot run leaves a note instead."""
    from .case_study import summarize_case_study, verdicts

    say = notify or (lambda _: None)
    criterion, notes = criterion_for(source, options)
    result = Analysis(source, options, criterion, notes=notes)
    con = connect(options.memory_limit)
    say("monosemantic ratio: aggregating the statistics")
    labels = {m.run_id: m.variant for m in source.members if m.variant}
    every = {m.run_id: int(((m.spec or {}).get("inhibition") or {}).get("track_every") or 1) for m in source.members}
    result.ratio = analyze_ratio(source.stats(), criterion, options.depth_bins, con, labels, every)
    result.notes += ratio_notes(result.ratio)
    known = {m.run_id for m in source.members}
    extra = [r for r in result.ratio.finals["run_id"] if r not in known]
    if extra:
        result.notes.append(
            f"{len(extra)} run(s) in the statistics are not members of this sweep: {', '.join(extra[:5])}"
        )
    result.members = member_table(source.members, result.ratio.finals)
    say("convergence: reading the members' held-out loss curves")
    convergence, convergence_notes = run_convergence(source, options)
    result.notes += convergence_notes
    result.convergence = convergence if len(convergence) else None
    if "ablation" in options.sections:
        ablation, ablation_notes, probes = run_ablation(source, options, say)
        result.notes += ablation_notes
        if len(ablation):
            result.ablation = ablation
            result.ablation_summary = summarize_ablation(ablation)
        if probes and criterion.calibrated:
            say("ratio vs probe: the ratio's flags against the probe's AUROCs")
            agreement, agreement_notes = run_probe_agreement(source, result.ratio, probes, con)
            result.notes += agreement_notes
            if len(agreement):
                result.probe_agreement = agreement
                result.probe_agreement_summary = summarize_agreement(agreement)
        elif probes:
            result.notes.append(
                "ratio vs probe: skipped, the monosemantic ratio is not measurable at this threshold "
                f"(record inhibition.ms_threshold: {RECOMMENDED_THRESHOLD:g})"
            )
    if "case_study" in options.sections:
        say("case study: one optimizer step per mode")
        try:
            case = run_case_study(source, options, say)
            result.case_study, result.case_member, result.case_step = case.per_batch, case.member.label, case.step
            result.case_summary = summarize_case_study(case.per_batch)
            result.case_verdicts = pd.concat(
                [verdicts(case.per_batch, v) for v in ("shared", "own")], ignore_index=True
            )
            result.notes += case.notes
        except (ConfigError, ValueError, OSError) as error:
            result.notes.append(f"case study skipped: {error}")
    if "significance" in options.sections:
        result.significance = significance(result.members)
        if not len(result.significance):
            result.notes.append("significance: no original/inhibited pairs (same rung, seed and top_n) with values")
    return result


# ---------------------------------------------------------------------------------------- outputs
OUTPUT_TABLES = (
    "members",
    "ratio_modules",
    "ratio_runs",
    "ratio_final",
    "ratio_by_rung",
    "ratio_over_steps",
    "ratio_depth",
    "ablation",
    "ablation_summary",
    "case_study",
    "case_study_summary",
    "case_study_verdicts",
    "significance",
    "convergence",
    "probe_agreement",
    "probe_agreement_summary",
)
OUTPUT_FIGURES = ("ratio_vs_scale", "ratio_over_steps", "depth_heatmap", "ablation_vs_size", "case_study")


def tables(analysis: Analysis) -> dict[str, pd.DataFrame]:
    """Every table by file stem."""
    found: dict[str, pd.DataFrame | None] = {"members": analysis.members}
    if analysis.ratio is not None:
        r = analysis.ratio
        found |= {
            "ratio_modules": r.modules,
            "ratio_runs": r.runs,
            "ratio_final": r.finals,
            "ratio_by_rung": r.by_rung,
            "ratio_over_steps": r.over_steps,
            "ratio_depth": r.depth,
        }
    found |= {
        "ablation": analysis.ablation,
        "ablation_summary": analysis.ablation_summary,
        "case_study": analysis.case_study,
        "case_study_summary": analysis.case_summary,
        "case_study_verdicts": analysis.case_verdicts,
        "significance": analysis.significance,
        "convergence": analysis.convergence,
        "probe_agreement": analysis.probe_agreement,
        "probe_agreement_summary": analysis.probe_agreement_summary,
    }
    return {name: frame for name, frame in found.items() if frame is not None}


def figures(analysis: Analysis) -> dict[str, bytes]:
    """Every figure by file stem."""
    found: dict[str, bytes] = {}
    r = analysis.ratio
    if r is not None and len(r.by_rung) and r.by_rung["ratio_mean"].notna().any():
        found["ratio_vs_scale"] = plots.ratio_vs_scale(r.by_rung, analysis.criterion.describe())
        found["ratio_over_steps"] = plots.ratio_over_steps(r.over_steps)
        found["depth_heatmap"] = plots.depth_heatmap(r.depth, analysis.options.depth_bins)
    if analysis.ablation_summary is not None:
        found["ablation_vs_size"] = plots.ablation_vs_size(analysis.ablation_summary, analysis.options.probe_group)
    if analysis.case_summary is not None:
        shown = case_headline(analysis.case_summary)
        if len(shown):
            found["case_study"] = plots.case_study_bars(
                shown, f"{analysis.case_member or ''} at lr {shown['lr'].iloc[0]:.3g}"
            )
    return found


def case_headline(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary rows a figure and the terminal lead with: shared weights, top-MS selection, the first lr."""
    part = summary[(summary["variant"] == "shared") & (summary["selection"] == "top_ms")]
    return part[part["lr_name"] == part["lr_name"].iloc[0]] if len(part) else part


def case_verdict_records(analysis: Analysis) -> list[dict[str, Any]]:
    """The Table 4 ordering claims with their paired CIs and verdicts (for summary.json)."""
    return [] if analysis.case_verdicts is None else analysis.case_verdicts.to_dict("records")


def _case_columns(summary: pd.DataFrame) -> pd.DataFrame:
    columns = [
        "variant",
        "lr_name",
        "lr",
        "selection",
        "mode",
        "batches",
        "decrease_ratio",
        "decrease_ratio_ci_low",
        "decrease_ratio_ci_high",
        "decrease_ratio_vs_original",
        "decrease_ratio_vs_original_ci_low",
        "decrease_ratio_vs_original_ci_high",
        "decrease_ratio_vs_naive_b",
        "decrease_ratio_vs_naive_b_ci_low",
        "decrease_ratio_vs_naive_b_ci_high",
        "update_ratio",
        "update_ratio_all",
        "quotient",
        "quotient_ci_low",
        "quotient_ci_high",
        "alignment",
        "alignment_weighted",
        "paper_decrease_ratio",
        "paper_total_update_ratio",
        "paper_quotient",
    ]
    return summary[[c for c in columns if c in summary]]


def sections(analysis: Analysis, images: dict[str, bytes]) -> list[Section]:
    """The report's sections."""
    options, criterion = analysis.options, analysis.criterion
    out: list[Section] = []
    r = analysis.ratio
    if r is not None:
        section = Section(
            "1. Monosemantic ratio vs scale",
            [
                (
                    f"A neuron is monosemantic at a snapshot when {criterion.describe()} since the previous snapshot: a sparse "
                    "feature active on a fraction p of the samples has MS ~ (1 - p)/p on them. The ratio is the fraction of a run's "
                    "tested neurons (all inserted modules) that are. Means and 95% confidence intervals (Student t) over seeds."
                ),
                f"Null: {criterion.null_text()}.",
                (
                    f"null_ratio is the fraction a run of featureless neurons would show; p_value tests the run's flagged count "
                    f"against it (one-sided binomial); a ratio with p >= {RUN_LEVEL:g} is indistinguishable from noise. "
                    "Missing values: not measurable (too few samples per snapshot, or a threshold that does not clear the null)."
                ),
            ],
        )
        for name, caption in (
            ("ratio_vs_scale", "Final monosemantic ratio per rung and mode (hollow: not significant against the null)"),
            ("ratio_over_steps", "Monosemantic ratio over training steps"),
            ("depth_heatmap", f"Final monosemantic ratio by relative layer depth ({options.depth_bins} bins)"),
        ):
            if name in images:
                section.figures.append((caption, images[name]))
        section.tables.append(("Final ratio per rung and mode", r.by_rung))
        section.collapsed.append(("Per run, final snapshot", r.finals))
        section.collapsed.append(("Per relative-depth bin", r.depth))
        out.append(section)
    if analysis.ablation_summary is not None:
        neurons = "neuron" if options.probe_neurons == 1 else f"{options.probe_neurons} neurons"
        section = Section(
            "2. Mean-ablation of a probed feature neuron (Figure 2)",
            [
                (
                    f"For each trained member, a sparse probe scores every MLP neuron (every layer, one value per token) by the AUROC "
                    f"of its activation for {options.probe_group!r} target tokens against the rest, on half of "
                    f"{options.ablation_batches} held-out batches; the best {neurons} is set to its mean over those batches, and on "
                    "the other half the loss is measured with and without it. % increase = 100 x (ablated - base) / base per "
                    f"token group; 'difference' = {options.probe_group!r} minus 'other' (> 0: the ablation hurts the probed group "
                    f"more). Control: {options.control_draws} draws of as many random neurons of the same modules. Means and 95% CIs "
                    "(Student t) over seeds; each member's own bootstrap CI is in the per-member table. trend_slope: least-squares "
                    "slope of the members' % increase against log10(parameters), % per tenfold size (< 0: shrinks with scale); "
                    "excess: the probed neuron's % increase minus the control's mean, and excess_trend its slope (any one neuron "
                    "is a smaller share of a wider model, so the feature-specific part of a trend is the excess's)."
                ),
            ],
        )
        if "ablation_vs_size" in images:
            section.figures.append(("% loss increase against model size", images["ablation_vs_size"]))
        section.tables.append(("% loss increase per rung, variant and group (over seeds)", analysis.ablation_summary))
        if analysis.ablation is not None:
            section.collapsed.append(("Per member (CI: bootstrap over evaluation windows)", analysis.ablation))
        out.append(section)
    if analysis.probe_agreement_summary is not None:
        out.append(
            Section(
                "2b. The ratio's flag against the probe",
                [
                    (
                        "Per member, every probed MLP neuron's AUROC (section 2's probe) against whether the monosemantic ratio flags "
                        "it at the last statistics snapshot (tested modules only). flag_auc: the probability that a flagged neuron has "
                        "the higher AUROC (selectivity: |AUROC - 0.5| x 2) than an unflagged one (0.5: no relation), Mann-Whitney "
                        "p-value; enrichment: the flagged fraction among the 10% highest-AUROC neurons minus that of the rest, "
                        "Fisher's exact p-value; best_flagged: whether the probe's best neuron is flagged. Across members: means and "
                        "95% Student-t CIs; agrees: the CI lies above the no-relation value."
                    ),
                ],
                tables=[("Over members", analysis.probe_agreement_summary)],
                collapsed=[("Per member", analysis.probe_agreement)] if analysis.probe_agreement is not None else [],
            )
        )
    if analysis.case_summary is not None:
        optimizer = (
            "its own AdamW (moments, step count, hyperparameters) from the checkpoint"
            if options.case_optimizer == "run"
            else "plain SGD"
        )
        section = Section(
            "3. Inhibition case study (Table 4)",
            [
                (
                    f"Member {analysis.case_member} at step {analysis.case_step}: per batch ({options.case_batches} fixed training "
                    f"batches) and mode, one optimizer step with {optimizer}, gradient clipping as in training, at each learning "
                    f"rate ({', '.join(options.case_lrs)}; run = the member's last), from the same weights (variant shared). The "
                    "values are chosen in the training forward that is modified and stepped (the top-n Monosemantic Scale per sample "
                    "against the trained statistics, or as a control the same count at random); the same inputs are fed again with the "
                    "same seed and the same values replaced, and z' is read there. Variant own: each mode from its own trained member."
                ),
                (
                    "Decrease Ratio = mean over the chosen values of (1 - phi(z')/phi(z)) x 100%; Total Update Ratio = mean |z'/z - 1| "
                    "x 100% over the chosen values (update_ratio; over every value: update_ratio_all); quotient = Decrease Ratio / Total "
                    "Update Ratio (free of the learning rate). alignment (Lemma 3.3): the fraction of chosen values whose gradient at the "
                    "modified value points back toward z (sign(-g) = sign(z - mean)); alignment_weighted weights each by |g| |z - mean|. "
                    "Differences against original and naive_b are paired by batch, with 95% t intervals."
                ),
                (
                    "The paper (Swin-B, lr 2e-6): Decrease Ratio original +0.003%, naive (a) -0.017%, naive (b) -0.044%, rd +0.013%; "
                    "Total Update Ratio 0.052%, 0.118%, 0.161%, 0.189%."
                ),
            ],
        )
        if "case_study" in images:
            section.figures.append(
                ("Decrease Ratio and quotient per mode (shared weights, top-MS selection)", images["case_study"])
            )
        if analysis.case_verdicts is not None and len(analysis.case_verdicts):
            section.tables.append(
                ("The paper's orderings of the Decrease Ratio, paired by batch", analysis.case_verdicts)
            )
        section.tables.append(
            ("Per variant, learning rate, selection and mode, over batches", _case_columns(analysis.case_summary))
        )
        if analysis.case_study is not None:
            section.collapsed.append(("Per batch", analysis.case_study))
        out.append(section)
    if analysis.significance is not None and len(analysis.significance):
        out.append(
            Section(
                "4. Significance (Table 9)",
                [
                    (
                        "Paired t-test (scipy.stats.ttest_rel) of inhibited against original members with the same rung and seed (and "
                        "top_n, where the originals vary it), pooled over rungs (scope all) and per rung; t < 0: the inhibited runs have "
                        "the lower value. heldout_* metrics are the full held-out set at the end of each run (eval.final: all)."
                    ),
                    (
                        "Power: detectable_80 is the smallest mean difference this test detects with 80% power (two-sided, alpha 0.05, "
                        "the observed spread of the paired differences); power_at_paper is its power to detect the paper's relative "
                        "effect of MEmeL-Tune (paper_relative) times the original mean. A non-significant result with low "
                        "power_at_paper is inconclusive, not a refutation."
                    ),
                ],
                tables=[("Paired t-tests", analysis.significance)],
            )
        )
    if analysis.convergence is not None:
        options = analysis.options
        out.append(
            Section(
                "Convergence",
                [
                    (
                        f"Per member, whether the held-out loss flattened. Curve 'checkpoints': every retained checkpoint scored on the "
                        f"same {CURVE_BATCHES} held-out batches spread over the held-out set; 'eval/loss': the run's periodic "
                        f"evaluations (other held-out files each time). A least-squares line through the points of the last {options.flat_tail:.0%} of the steps falls by tail_drop; relative = tail_drop / "
                        f"total_drop (first evaluation minus the line's end); flattened when relative < {options.flat_threshold:g}."
                    ),
                ],
                tables=[("Per member", analysis.convergence)],
            )
        )
    if analysis.members is not None:
        out.append(Section("Members", tables=[("Every member with its final metrics", analysis.members)]))
    if analysis.notes:
        out.append(Section("Notes", list(analysis.notes)))
    return out


def write(analysis: Analysis, out: Path) -> list[Path]:
    """Tables (CSV and Parquet), figures (PNG), ``report.html`` and ``summary.json`` under ``out``
    (outputs of an earlier run that this one does not produce are removed; nothing else is touched)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [
        *(f"{t}.{e}" for t in OUTPUT_TABLES for e in ("csv", "parquet")),
        *(f"{f}.png" for f in OUTPUT_FIGURES),
    ]:
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
    meta = {
        "target": source.target,
        "statistics": source.stats_root,
        "members": str(len(source.members)),
        "MLflow parent run": f"{source.parent_run_id or '-'} ({source.tracking_uri or 'no tracking store'})",
        "criterion": analysis.criterion.describe(),
    }
    (out / "report.html").write_text(render(f"memel analyze: {source.target}", meta, sections(analysis, images)))
    summary = {
        "target": source.target,
        "parent_run_id": source.parent_run_id,
        "stats_root": source.stats_root,
        "criterion": asdict(analysis.criterion),
        "criterion_null": analysis.criterion.null_text(),
        "options": asdict(analysis.options),
        "case_member": analysis.case_member,
        "case_verdicts": case_verdict_records(analysis),
        "notes": analysis.notes,
    }
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
