"""Job specs: one schema for runs, sweeps and studies; every malformed spec is refused through the
real CLI with an error naming the field, the value and what is allowed, and leaves nothing behind."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from memel.cli import app
from memel.errors import ConfigError
from memel.orchestration import expand_sweep, load_job
from memel.orchestration.study import make_sampler, suggest, trial_key

RUNNER = CliRunner(env={"COLUMNS": "240"})
JOBS = Path(__file__).resolve().parents[1] / "jobs"
BASE: dict[str, Any] = yaml.safe_load((JOBS / "quickstart.yaml").read_text())


def _write(tmp_path: Path, tree: Any, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree) if not isinstance(tree, str) else tree)
    return path


def _with(**changes: Any) -> dict[str, Any]:
    """The quickstart job with top-level sections replaced or merged (None removes a section)."""
    tree = yaml.safe_load(yaml.safe_dump(BASE))
    for key, value in changes.items():
        if value is None:
            tree.pop(key, None)
        elif isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key] = {**tree[key], **value}
        else:
            tree[key] = value
    return tree


TUNE = {"trials": 3}
MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    ("unknown-section", _with(trainn={"steps": 3}), r"job\.trainn: unknown field; allowed fields: name, model, data"),
    (
        "unknown-train-key",
        _with(train={"stepz": 3}),
        r"job\.train\.stepz: unknown field; allowed fields: steps, global_batch_size",
    ),
    ("zero-steps", _with(train={"steps": 0}), r"job\.train\.steps: .*greater than or equal to 1 \(got 0\)"),
    ("zero-stage-4", _with(train={"zero_stage": 4}), r"job\.train\.zero_stage: ZeRO stage must be 0, 1, 2 or 3, got 4"),
    (
        "batch-does-not-divide",
        _with(train={"global_batch_size": 12}),
        r"global_batch_size=12 does not divide .* use a multiple of 16",
    ),
    ("bf16-on-cpu", _with(train={"precision": "bf16"}), r"precision='bf16' needs use_gpu: true"),
    (
        "bad-mode",
        _with(inhibition={"mode": "reverse"}),
        r"job\.inhibition\.mode: .*'rd', 'naive_a', 'naive_b', 'original' or 'l2e' \(got 'reverse'\)",
    ),
    (
        "strength-on-naive",
        _with(inhibition={"mode": "naive_a", "strength": 2.0}),
        r"strength=2.0 is only used by mode 'rd'",
    ),
    (
        "unknown-model",
        _with(model={"name": "pythia-3b"}, sweep=None),
        r"model: unknown name 'pythia-3b'; known models: pythia-14m",
    ),
    (
        "unknown-preset",
        _with(model={"preset": "everywhere"}, sweep=None),
        r"unknown preset 'everywhere'; allowed for this model: mlp",
    ),
    (
        "paper-preset-layout-channel",
        _with(model={"preset": "paper"}, inhibition={"layout": "channel"}),
        r"inhibition\.layout: 'channel' contradicts model\.preset 'paper'.* set inhibition\.layout: element",
    ),
    ("bad-data-kind", _with(data={"kind": "video"}), r"data: .*video"),
    ("bad-name", _with(name="my job"), r"job\.name: .*pattern"),
    (
        "unknown-rung",
        _with(sweep={"rungs": ["byte-0.2m", "pythia-3b"]}),
        r"sweep member pythia-3b-original: model: unknown name 'pythia-3b'",
    ),
    ("duplicate-mode", _with(sweep={"modes": ["rd", "rd"]}), r"job\.sweep\.modes: lists a value twice: \['rd', 'rd'\]"),
    ("duplicate-rung", _with(sweep={"rungs": ["byte-1m", "byte-1m"]}), r"job\.sweep\.rungs: lists a model twice"),
    (
        "unknown-sweep-key",
        _with(sweep={"rungz": ["byte-1m"]}),
        r"job\.sweep\.rungz: unknown field; allowed fields: rungs, modes, strengths",
    ),
    (
        "zero-concurrency",
        _with(sweep={"max_concurrent": 0}),
        r"job\.sweep\.max_concurrent: .*greater than or equal to 1",
    ),
    (
        "rung-setting-unknown",
        _with(sweep={"rungs": [{"model": "byte-1m", "set": {"train.stepz": 3}}]}),
        r"sweep member byte-1m-original: train\.stepz: unknown field",
    ),
    (
        "rung-setting-bad-value",
        _with(sweep={"rungs": [{"model": "byte-1m", "set": {"train.lr": -1}}]}),
        r"sweep member byte-1m-original: train\.lr: .*greater than 0",
    ),
    ("sweep-and-tune", _with(tune=TUNE), r"has both sweep and tune sections"),
    (
        "tune-bad-storage",
        _with(sweep=None, tune={"storage": "redis://127.0.0.1/0"}),
        r"job\.tune\.storage: unsupported storage URL 'redis://127.0.0.1/0'; allowed schemes: sqlite:///",
    ),
    (
        "tune-sqlite-parallel",
        _with(sweep=None, tune={"parallel": 2, "storage": "sqlite:///x.db"}),
        r"SQLite, which is not safe for 2 parallel trials; use postgresql",
    ),
    (
        "tune-range-reversed",
        _with(sweep=None, tune={"space": {"strength": {"low": 10, "high": 1}}}),
        r"job\.tune\.space\.strength: needs finite low <= high, got low=10.0, high=1.0",
    ),
    (
        "tune-log-from-zero",
        _with(sweep=None, tune={"space": {"strength": {"low": 0, "high": 1, "log": True}}}),
        r"log=true needs low > 0",
    ),
    (
        "tune-grid-with-tpe",
        _with(sweep=None, tune={"grid": "paper", "sampler": "tpe"}),
        r"grid: 'paper' needs sampler: grid \(got sampler: 'tpe'\)",
    ),
    (
        "tune-direction",
        _with(sweep=None, tune={"direction": "sideways"}),
        r"job\.tune\.direction: .*'minimize' or 'maximize'",
    ),
    (
        "tune-empty-choices",
        _with(sweep=None, tune={"space": {"top_n": []}}),
        r"job\.tune\.space\.top_n: needs distinct choices, got \[\]",
    ),
    (
        "tune-negative-late-start",
        _with(sweep=None, tune={"space": {"late_start": {"low": -1, "high": 3}}}),
        r"job\.tune\.space\.late_start: needs low >= 0",
    ),
]


@pytest.mark.parametrize(
    ("tree", "expected"), [(t, e) for _, t, e in MALFORMED], ids=[name for name, _, _ in MALFORMED]
)
def test_malformed_job_is_refused_naming_the_field_and_nothing_is_written(
    tree: dict[str, Any], expected: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    path = _write(tmp_path, {**tree, "output_dir": str(out)})
    for command in ("validate", "run"):
        result = RUNNER.invoke(app, [command, str(path)])
        assert result.exit_code == 2, result.output
        assert re.search(expected, " ".join(result.output.split())), result.output
    assert not out.exists(), "a refused job must leave nothing behind"


@pytest.mark.parametrize(
    ("content", "expected"),
    [("train: [1, 2\n", "not valid YAML"), ("", "is empty"), ("42\n", "mapping of sections"), (None, "no such file")],
    ids=["broken-yaml", "empty", "scalar", "missing"],
)
def test_unreadable_job_files(content: str | None, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    if content is not None:
        path.write_text(content)
    result = RUNNER.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and expected in result.output, result.output


def test_commands_refuse_the_wrong_kind_of_job(tmp_path: Path) -> None:
    study = _write(tmp_path, _with(sweep=None, tune=TUNE, output_dir=str(tmp_path / "out")), "study.yaml")
    result = RUNNER.invoke(app, ["run", str(study)])
    assert result.exit_code == 2 and "memel tune" in result.output
    sweep = _write(tmp_path, _with(output_dir=str(tmp_path / "out")), "sweep.yaml")
    result = RUNNER.invoke(app, ["tune", str(sweep)])
    assert result.exit_code == 2 and "has no tune section" in " ".join(result.output.split())
    result = RUNNER.invoke(app, ["run", str(sweep), "--set", "train"])
    assert result.exit_code == 2 and "expected dotted.key=value" in result.output
    assert not (tmp_path / "out").exists()


def test_sweep_expands_every_combination_once() -> None:
    job = load_job(JOBS / "quickstart.yaml", ["sweep.strengths=[1, 5]", "sweep.seeds=[0, 1]"])
    members = expand_sweep(job)
    # 3 rungs x (original + rd at 2 strengths) x 2 seeds: strength only varies rd
    assert len(members) == 3 * 3 * 2
    keys = [m.key for m in members]
    assert len(set(keys)) == len(keys)
    by_key = {m.key: m for m in members}
    rd5 = by_key["byte-4m-rd-D5-s1"]
    assert (rd5.spec.model.name, rd5.spec.inhibition.mode, rd5.spec.inhibition.strength, rd5.spec.train.seed) == (
        "byte-4m",
        "rd",
        5.0,
        1,
    )
    assert by_key["byte-1m-original-s0"].spec.inhibition.strength == 1.0
    assert rd5.spec.out == job.out / "members" / "byte-4m-rd-D5-s1"
    assert len({m.spec.run_name for m in members}) == len(members)


def test_rung_settings_apply_to_that_rung_only() -> None:
    job = load_job(JOBS / "scale_sweep_pythia.yaml")
    members = {m.key: m.spec for m in expand_sweep(job)}
    assert members["pythia-2.8b-rd"].train.zero_stage == 3 and members["pythia-2.8b-rd"].train.micro_batch_size == 2
    assert members["pythia-70m-rd"].train.zero_stage == 2 and members["pythia-70m-rd"].train.micro_batch_size == 8


def test_paper_grid_preset_and_suggestions() -> None:
    import optuna

    job = load_job(JOBS / "tune_memel.yaml", ["tune.grid=paper"])
    assert job.tune.sampler == "grid"
    study = optuna.create_study(sampler=make_sampler(job.tune))
    seen = set()
    for _ in range(25):
        trial = study.ask()
        overrides = suggest(trial, job, job.tune)
        seen.add((overrides["inhibition.top_n"], overrides["inhibition.strength"]))
        study.tell(trial, 0.0)
    assert seen == {(n, float(d)) for n in (1, 5, 10, 50, 100) for d in (1, 5, 10, 50, 100)}

    tpe = load_job(JOBS / "tune_memel.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(20):
        overrides = suggest(study.ask(), tpe, tpe.tune)
        if overrides["inhibition.mode"] == "rd":
            assert 0.1 <= overrides["inhibition.strength"] <= 100.0
        else:
            assert overrides["inhibition.strength"] == 1.0  # the naive baselines fix D
        assert trial_key(overrides) == trial_key(dict(reversed(list(overrides.items()))))


def test_load_job_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"job\.sweep\.seeds: lists a value twice"):
        load_job(JOBS / "quickstart.yaml", ["sweep.seeds=[1, 1]"])


def test_mode_variants_carry_their_own_settings() -> None:
    job = load_job(JOBS / "l2e_vs_memel.yaml")
    members = {m.key: m for m in expand_sweep(job)}
    assert len(members) == 3 * 3 * 2
    l2e, memel_rd = members["byte-1m-l2e-s0"], members["byte-1m-memel-s1"]
    assert (l2e.mode, l2e.spec.inhibition.mode, l2e.spec.inhibition.select, l2e.spec.inhibition.fraction) == (
        "l2e",
        "l2e",
        "threshold",
        0.02,
    )
    assert (memel_rd.spec.inhibition.mode, memel_rd.spec.inhibition.select) == ("rd", "top_n")
    with pytest.raises(
        ConfigError, match=r"job\.sweep\.modes: lists a value twice: \['rd', 'rd'\]; .*name the variants apart"
    ):
        load_job(JOBS / "l2e_vs_memel.yaml", ["sweep.modes=[rd, {mode: rd, set: {inhibition.select: threshold}}]"])
    with pytest.raises(ConfigError, match=r"sweep member byte-0.2m-l2e-s0: inhibition.*fraction"):
        load_job(JOBS / "l2e_vs_memel.yaml", ["sweep.modes=[{mode: l2e, set: {inhibition.fraction: 0.05}}]"])


@pytest.mark.parametrize("name", ["table4.yaml", "table4-gpu.yaml"])
def test_paper_jobs_insert_as_the_paper_does(name: str) -> None:
    members = expand_sweep(load_job(JOBS / "paper" / name))
    assert sorted(m.spec.inhibition.mode for m in members) == ["naive_a", "naive_b", "original", "rd"]
    for member in members:
        assert (member.spec.model.preset, member.spec.inhibition.layout, member.spec.inhibition.top_n) == (
            "paper",
            "element",
            1,
        )
        assert member.spec.train.zero_stage <= 2  # the case study reads the optimizer state of ZeRO 0-2


@pytest.mark.parametrize("name", ["gain_lm_pretrain.yaml", "gain_lm_pretrain-gpu.yaml"])
def test_lm_pretrain_jobs_pair_original_and_rd_on_matched_tokens(name: str) -> None:
    members = expand_sweep(load_job(JOBS / "paper" / name))
    rungs = {m.spec.model.name for m in members}
    assert len(rungs) == 2 and {m.spec.inhibition.mode for m in members} == {"original", "rd"}
    for rung in rungs:  # every seed has one member per mode on each rung: the pairs of the t-test
        seeds = {
            mode: sorted(
                m.spec.train.seed for m in members if (m.spec.model.name, m.spec.inhibition.mode) == (rung, mode)
            )
            for mode in ("original", "rd")
        }
        assert seeds["original"] == seeds["rd"] and len(seeds["rd"]) >= 3
    tokens = {m.spec.train.steps * m.spec.train.global_batch_size * m.spec.data["seq_len"] for m in members}
    assert len(tokens) == 1  # matched tokens across rungs and modes
    for member in members:
        inhibition = member.spec.inhibition
        assert (member.spec.model.preset, inhibition.layout, inhibition.top_n, inhibition.strength) == (
            "paper",
            "element",
            1,
            1.0,
        )
        assert member.spec.eval.final == "all" and member.spec.data["kind"] == "text_lm"
    from memel.models import preset_targets

    inserted = {"byte-2l-d16": 2, "byte-2l-d32": 2, "byte-1m": 4, "byte-4m": 4}  # all of 2 blocks; 0-3 of 5
    for rung in rungs:
        assert preset_targets(rung, "paper") == [f"layers.{i}" for i in range(inserted[rung])]


@pytest.mark.parametrize(
    ("tune", "finetune", "metric"),
    [
        ("gain_encoder_tune", "gain_encoder_finetune", "heldout/accuracy"),
        ("gain_nowcast_tune", "gain_nowcast_finetune", "heldout/b_mse"),
    ],
)
@pytest.mark.parametrize("variant", ["", "-gpu"])
def test_each_paper_tune_searches_the_fine_tune_it_feeds(tune: str, finetune: str, metric: str, variant: str) -> None:
    """MEmeL-Tune's n and D go into a fine-tune's rd-tuned member: the study must train exactly
    that fine-tune (model, data, steps, optimizer, evaluation) on a seed none of its members uses."""
    study = yaml.safe_load((JOBS / "paper" / f"{tune}{variant}.yaml").read_text())
    sweep = yaml.safe_load((JOBS / "paper" / f"{finetune}{variant}.yaml").read_text())
    for section in ("model", "data", "inhibition", "eval", "checkpoint"):
        assert study[section] == sweep[section], section
    assert {k: v for k, v in study["train"].items() if k != "seed"} == sweep["train"]
    assert study["train"]["seed"] not in sweep["sweep"]["seeds"]
    assert (study["tune"]["grid"], study["tune"]["trials"], study["tune"]["metric"]) == ("paper", 25, metric)
    assert study["tune"]["direction"] == ("maximize" if metric.endswith("accuracy") else "minimize")
