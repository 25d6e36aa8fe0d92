"""Hostile and malformed input: every case is one ``error:`` line naming the field, exit 2, no
traceback, and nothing written (no output folder, no new file in the working folder).

The table runs in-process through the CLI's own entry point (the Typer app, as ``memel``
runs it); a representative subset also runs as ``python -m memel`` in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from memel.cli import app

RUNNER = CliRunner(env={"COLUMNS": "200"})
ROOT = Path(__file__).resolve().parents[1]
SMOKE = (ROOT / "jobs" / "smoke.yaml").read_text()
SWEEP = (ROOT / "jobs" / "quickstart.yaml").read_text()


def _bomb(levels: int = 9) -> str:
    """A "billion laughs" spec: 9 aliases of 9 aliases ... (9**9 strings once expanded)."""
    lines = ["name: bomb", 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join([*lines, f"train: {{steps: *a{levels}}}", ""])


def _inline_bomb() -> str:
    """The same bomb as one flow value for ``--set``."""
    parts = ['[&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    parts += [f"&a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return ",".join(parts) + "]"


def _with(base: str = SMOKE, **sections: object) -> str:
    """``base`` (YAML) with top-level sections replaced or merged one level deep."""
    tree = yaml.safe_load(base)
    for name, value in sections.items():
        tree[name] = {**tree[name], **value} if isinstance(value, dict) and isinstance(tree.get(name), dict) else value
    return yaml.safe_dump(tree, sort_keys=False)


@dataclass
class Case:
    """A command line (``{spec}``, ``{tmp}`` filled in) and the error it must give."""

    name: str
    args: list[str]
    expected: str
    spec: str | bytes | None = SMOKE
    prepare: Callable[[Path], None] | None = None
    output: bool = True  # append --set output_dir=<tmp>/out
    env: dict[str, str] = field(default_factory=dict)


def _corrupt_run_json(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "run.json").write_text('{"run_name": "smoke-x", "run_id": ')


def _another_specs_run(tmp: Path) -> None:
    """``out`` holds the run of the case's spec with another learning rate (``spec.yaml`` exists)."""
    from memel.training import load_spec

    (tmp / "out").mkdir()
    other = load_spec(tmp / "spec.yaml", ["train.lr=0.01"]).run_name
    (tmp / "out" / "run.json").write_text(json.dumps({"run_name": other, "run_id": "r0"}))


def _a_single_runs_folder(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "run.json").write_text(json.dumps({"run_name": "smoke-0123456789", "run_id": "r0"}))


def _corrupt_sweep_json(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "sweep.json").write_text("[1, 2]")


def _stats(root: Path, truncate: bool) -> None:
    """Two runs' statistics through the real sink; ``truncate`` cuts the last file in half."""
    import numpy as np
    import torch

    from memel.inhibition import Snapshot
    from memel.stats import ParquetStatsSink, snapshot_table

    for seed in range(2):
        with ParquetStatsSink(str(root), f"run{seed}") as sink:
            for step in (10, 20):
                n = 8
                snap = Snapshot(
                    mean=torch.zeros(n),
                    var=torch.ones(n),
                    count=torch.full((n,), step * 100, dtype=torch.int64),
                    selected_count=torch.zeros(n, dtype=torch.int64),
                    inhibited_count=torch.zeros(n, dtype=torch.int64),
                    max_ms=torch.full((n,), 20.0),
                    mean_ms=torch.ones(n),
                    frac_above=torch.from_numpy(np.full(n, 0.01, np.float32)),
                    batches=step,
                    neuron_shape=(n,),
                )
                context = {
                    "model": "byte-0.2m",
                    "n_params": 1000,
                    "mode": "rd",
                    "strength": 1.0,
                    "top_n": 1,
                    "seed": seed,
                }
                table = snapshot_table(
                    snap,
                    run_id=f"run{seed}",
                    step=step,
                    tokens_seen=step,
                    module="blocks.0.mlp.act",
                    depth=0.0,
                    **context,
                )
                sink.submit(table, module="blocks.0.mlp.act", step=step)
    if truncate:
        last = sorted(root.rglob("*.parquet"))[-1]
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])


def _truncated_parquet(tmp: Path) -> None:
    _stats(tmp / "stats", truncate=True)


def _sweep_folder(tmp: Path, sweep_json: str, run_json: str = '{"run_id": "run0"}') -> None:
    _stats(tmp / "sweep" / "stats", truncate=False)
    (tmp / "sweep" / "sweep.json").write_text(sweep_json)
    member = tmp / "sweep" / "members" / "m0"
    member.mkdir(parents=True)
    (member / "run.json").write_text(run_json)
    (member / "spec.json").write_text(json.dumps({"name": "m0"}))


def _deep_set(depth: int) -> str:
    return "[" * depth + "]" * depth


V, R, T = "validate", "run", "train"
CASES: list[Case] = [
    # 1. aliases: a "billion laughs" spec is refused while small, in every command that reads specs
    Case("alias-bomb-validate", [V, "{spec}"], r"holds more than 20000 values once its aliases", _bomb()),
    Case("alias-bomb-run", [R, "{spec}"], r"holds more than 20000 values once its aliases", _bomb()),
    Case("alias-bomb-train", [T, "{spec}"], r"spec: .* holds more than 20000 values", _bomb()),
    Case(
        "alias-bomb-set",
        [V, "{spec}", "--set", f"sweep.seeds={_inline_bomb()}"],
        r"--set sweep.seeds: .* holds more than 20000 values",
    ),
    Case(
        "alias-recursive",
        [V, "{spec}"],
        r"line 2, column 8: an alias refers to a node that contains it",
        "name: x\ntrain: &t\n  steps: *t\n",
    ),
    Case(
        "alias-recursive-set",
        [V, "{spec}", "--set", "train.steps=&a [*a]"],
        r"--set train.steps: .* an alias refers to a node that contains it",
    ),
    # 2. duplicate keys
    Case(
        "duplicate-section",
        [V, "{spec}"],
        r"key 'train' is given twice \(lines 2 and 4\)",
        "name: d\ntrain:\n  steps: 3\ntrain:\n  lr: 0.1\n",
    ),
    Case(
        "duplicate-field",
        [V, "{spec}"],
        r"key 'steps' is given twice \(lines 3 and 4\)",
        "name: d\ntrain:\n  steps: 3\n  steps: 4\n",
    ),
    Case(
        "duplicate-train-spec",
        [T, "{spec}"],
        r"spec: .*key 'name' is given twice \(lines 1 and 2\)",
        "name: a\nname: b\n",
    ),
    Case("duplicate-flow", [V, "{spec}"], r"key 'lr' is given twice", "name: d\ntrain: {lr: 0.1, lr: 0.2}\n"),
    # 3. non-finite numbers, in files and in --set
    Case("inf-file", [V, "{spec}"], r"job\.train\.lr: not a finite number", _with(train={"lr": float("inf")})),
    Case("minus-inf-file", [V, "{spec}"], r"job\.train\.lr: not a finite number", "name: x\ntrain:\n  lr: -.inf\n"),
    Case(
        "nan-file",
        [V, "{spec}"],
        r"job\.inhibition\.strength: not a finite number",
        "name: x\ninhibition:\n  strength: .nan\n",
    ),
    Case(
        "inf-string-file",
        [V, "{spec}"],
        r"job\.train\.lr: Input should be a finite number",
        "name: x\ntrain:\n  lr: inf\n",
    ),
    Case(
        "nan-in-data",
        [V, "{spec}"],
        r"job\.data\.heldout_fraction: not a finite",
        "name: x\ndata: {kind: text_lm, heldout_fraction: .nan}\n",
    ),
    Case(
        "inf-in-sweep-list",
        [V, "{spec}"],
        r"job\.sweep\.strengths\[1\]: not a finite",
        _with(SWEEP, sweep={"strengths": [1.0, float("inf")]}),
    ),
    Case(
        "inf-train-spec", [T, "{spec}"], r"spec\.train\.grad_clip: not a finite", "name: x\ntrain: {grad_clip: .inf}\n"
    ),
    Case("inf-set", [V, "{spec}", "--set", "train.lr=.inf"], r"--set train\.lr: not a finite number"),
    Case(
        "minus-inf-set",
        [V, "{spec}", "--set", "train.weight_decay=-.inf"],
        r"--set train\.weight_decay: not a finite number",
    ),
    Case(
        "nan-set",
        [V, "{spec}", "--set", "inhibition.strength=.nan"],
        r"--set inhibition\.strength: not a finite number",
    ),
    Case(
        "inf-string-set",
        [V, "{spec}", "--set", "train.lr=Infinity"],
        r"job\.train\.lr: Input should be a finite number",
    ),
    Case(
        "inf-nested-set",
        [V, "{spec}", "--set", "sweep={strengths: [1, .inf]}"],
        r"--set sweep\.strengths\[1\]: not a finite",
    ),
    # 4. malformed files and values: no traceback
    Case("binary-file", [V, "{spec}"], r"job: .* is a binary file", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    Case("binary-train-spec", [T, "{spec}"], r"spec: .* is a binary file", b"name: x\n\x00\x01\x02"),
    Case("not-utf8", [V, "{spec}"], r"is not UTF-8 text \(byte 9\)", "name: caf\xe9\n".encode("latin-1")),
    Case(
        "control-character",
        [V, "{spec}"],
        r"not valid YAML: character '\\x07' at position 7 is not allowed",
        "name: a\x07b\n",
    ),
    Case(
        "deep-flow",
        [V, "{spec}"],
        r"not valid YAML: line 2, .*nested deeper than 32 levels",
        f"name: x\ntrain: {_deep_set(10_000)}\n",
    ),
    Case(
        "deep-flow-train",
        [T, "{spec}"],
        r"spec: .*nested deeper than 32 levels",
        f"name: x\ntrain: {_deep_set(10_000)}\n",
    ),
    Case(
        "deep-block",
        [V, "{spec}"],
        r"nested deeper than 32 levels",
        "name: x\n" + "".join("  " * i + f"k{i}:\n" for i in range(200)),
    ),
    Case(
        "huge-file",
        [V, "{spec}"],
        r"job: .* is 2,\d{3},\d{3} bytes, more than the 1,048,576",
        "name: x\n#" + "x" * (2 << 20) + "\n",
    ),
    Case(
        "huge-integer",
        [V, "{spec}"],
        r"not valid YAML: a value cannot be read",
        "name: x\ntrain:\n  steps: " + "9" * 5000 + "\n",
    ),
    Case(
        "broken-yaml",
        [V, "{spec}"],
        r"not valid YAML: line 3, column 1: expected ',' or '\]'",
        "name: x\ntrain: [1, 2\n",
    ),
    Case("scalar-file", [V, "{spec}"], r"must hold a mapping of sections, got int", "42\n"),
    Case("list-file", [V, "{spec}"], r"must hold a mapping of sections, got list", "- name: x\n"),
    Case("number-section", [V, "{spec}"], r"section name 1 is not a word", "1: x\n"),
    Case("empty-job", [V, "{spec}"], r"job: .* is empty; a job needs at least a name", ""),
    Case("missing-file", [V, "{tmp}/absent.yaml"], r"job: no such file '.*absent.yaml'", None),
    Case("folder-as-spec", [V, "{tmp}"], r"job: no such file", None, output=False),
    Case(
        "set-open-bracket",
        [V, "{spec}", "--set", "train.steps=[1,2"],
        r"--set train\.steps: '\[1,2' is not valid YAML \(line 1, column 5",
    ),
    Case(
        "set-at-sign",
        [V, "{spec}", "--set", "train.steps=@"],
        r"--set train\.steps: '@' is not valid YAML .*cannot start any token",
    ),
    Case("set-no-equals", [V, "{spec}", "--set", "train"], r"--set 'train': expected dotted\.key=value"),
    Case("set-empty-key", [V, "{spec}", "--set", "=3"], r"--set '': empty key"),
    Case("set-empty-part", [V, "{spec}", "--set", "train..steps=3"], r"--set 'train\.\.steps': empty key"),
    Case(
        "set-not-a-section",
        [V, "{spec}", "--set", "train.steps.x=1"],
        r"--set train\.steps\.x: 'steps' is not a section \(train\.steps holds 30\)",
    ),
    Case(
        "set-huge-value", [V, "{spec}", "--set", "name=" + "x" * 70_000], r"--set name: the value is 70,000 characters"
    ),
    Case(
        "set-deep-value",
        [V, "{spec}", "--set", f"train.steps={_deep_set(5000)}"],
        r"--set train\.steps: .*nested deeper than 32 levels",
    ),
    Case("set-deep-key", [V, "{spec}", "--set", "a." * 40 + "b=1"], r"more than 32 levels of keys"),
    Case(
        "set-huge-integer",
        [V, "{spec}", "--set", "train.steps=" + "9" * 5000],
        r"--set train\.steps: .*a value cannot be read \(Exceeds the limit \(4300 digits\) for integer string conversion\)",
    ),
    Case(
        "huge-value-quoted-short",
        [V, "{spec}", "--set", "train.steps=" + "'" + "x" * 5000 + "'"],
        r"job\.train\.steps: .*\(got 'x{20,}\.\.\.x+'\)",
    ),
    # 5. what the workers would refuse, refused before anything starts
    Case(
        "missing-data-path",
        [V, "{spec}", "--set", "data={kind: text_lm, paths: [/nonexistent/corpus]}"],
        r"data\.paths: '/nonexistent/corpus' does not exist on this machine",
    ),
    Case(
        "missing-data-path-run",
        [R, "{spec}", "--set", "data={kind: text_lm, paths: [/nonexistent/corpus]}"],
        r"data\.paths: .* does not exist",
    ),
    Case(
        "missing-tokenizer",
        [V, "{spec}", "--set", "data.tokenizer=/nonexistent/tokenizer.json"],
        r"data\.tokenizer: .* does not exist",
    ),
    Case(
        "missing-glue-folder",
        [V, "{spec}", "--set", "data={kind: glue, path: /nonexistent/glue}", "--set", "model.name=bert-byte-tiny"],
        r"data\.path: '/nonexistent/glue' does not exist",
    ),
    Case(
        "unknown-model-override",
        [V, "{spec}", "--set", "model.overrides={d_modle: 32}"],
        r"model\.overrides: DecoderConfig\.d_modle: unknown field; allowed fields: .*d_model",
    ),
    Case(
        "bad-model-override",
        [R, "{spec}", "--set", "model.overrides={n_heads: 0}"],
        r"model\.overrides: DecoderConfig\.n_heads: .*greater than or equal to 1",
    ),
    Case(
        "sequence-beyond-context",
        [V, "{spec}", "--set", "data.seq_len=100000"],
        r"data\.seq_len: 100000 exceeds the context of model byte-0\.2m \(context_length=256\)",
    ),
    Case(
        "batch-beyond-memory",
        [V, "{spec}", "--set", "train.micro_batch_size=1000000", "--set", "train.global_batch_size=2000000"],
        r"train\.micro_batch_size: byte-0\.2m with 2 workers .* needs about [\d,.]+ GiB of memory .* this machine has",
    ),
    Case(
        "model-beyond-memory",
        [
            V,
            "{spec}",
            "--set",
            "model={name: byte-0.2m, overrides: {d_model: 65536, n_heads: 64, n_layers: 32}}",
            "--set",
            "train.zero_stage=0",
        ],
        r"model\.name: byte-0\.2m with 2 workers .* needs about",
    ),
    Case(
        "deepspeed-unknown-zero-key",
        [V, "{spec}", "--set", "train.deepspeed={zero_optimization: {overlap_comms: true}}"],
        r"train\.deepspeed: DeepSpeed refuses it \(DeepSpeedZeroConfig: overlap_comms: Extra inputs",
    ),
    Case(
        "deepspeed-batch-size",
        [V, "{spec}", "--set", "train.deepspeed={train_batch_size: 7}"],
        r"train\.deepspeed\.train_batch_size: 7 disagrees with the spec's 16 \(from train\.global_batch_size\)",
    ),
    Case(
        "deepspeed-bad-type",
        [R, "{spec}", "--set", "train.deepspeed={bf16: {enabled: maybe}}"],
        r"train\.deepspeed: DeepSpeed refuses it \(DeepSpeedBF16Config: enabled",
    ),
    # 6. resources beyond the machine (the embedded default)
    Case(
        "workers-million",
        [V, "{spec}", "--set", "train.workers=1000000", "--set", "train.global_batch_size=4000000"],
        r"train\.workers: 1000000 workers x 1 thread\(s\) asked, this machine has \d+ CPU cores",
    ),
    Case(
        "workers-million-run",
        [R, "{spec}", "--set", "train.workers=1000000", "--set", "train.global_batch_size=4000000"],
        r"train\.workers: 1000000 workers",
    ),
    Case(
        "threads-per-worker",
        [V, "{spec}", "--set", "train.threads_per_worker=100000"],
        r"train\.workers: 2 workers x 100000 thread\(s\) asked",
    ),
    Case(
        "sweep-member-workers",
        [V, "{spec}", "--set", "train.workers=1000000", "--set", "train.global_batch_size=8000000"],
        r"sweep member .*: train\.workers: 1000000 workers",
        SWEEP,
    ),
    # 4. the cluster address, statistics and state files
    Case(
        "run-address-garbage",
        [
            R,
            "{spec}",
            "--address",
            "garbage",
            "--set",
            "tracking.uri=http://127.0.0.1:9",
            "--set",
            "stats.enabled=false",
        ],
        r"--address: cannot connect to the Ray cluster at 'garbage'",
    ),
    Case(
        "run-address-refused",
        [
            R,
            "{spec}",
            "--address",
            "127.0.0.1:9",
            "--set",
            "tracking.uri=http://127.0.0.1:9",
            "--set",
            "stats.enabled=false",
        ],
        r"--address: cannot connect .*127\.0\.0\.1:9",
    ),
    Case(
        "submit-address-garbage",
        ["submit", "{spec}", "--address", "garbage"],
        r"--address: 'garbage' is not a cluster address",
        output=False,
    ),
    Case(
        "submit-address-no-port",
        ["submit", "{spec}", "--address", "http://"],
        r"--address: 'http:' is not a cluster address|--address: 'http://' is not",
        output=False,
    ),
    Case(
        "analyze-truncated-parquet",
        ["analyze", "{tmp}/stats", "--out", "{tmp}/report", "--no-mlflow"],
        r"TARGET: a statistics file cannot be read .*part-\d+(-\w+)?\.parquet",
        None,
        _truncated_parquet,
        output=False,
    ),
    Case(
        "analyze-corrupt-sweep-json",
        ["analyze", "{tmp}/sweep", "--out", "{tmp}/report", "--no-mlflow"],
        r"sweep\.json: this state file cannot be read",
        None,
        lambda t: _sweep_folder(t, '{"parent_run_id": '),
        output=False,
    ),
    Case(
        "analyze-corrupt-run-json",
        ["analyze", "{tmp}/sweep", "--out", "{tmp}/report", "--no-mlflow"],
        r"m0/run\.json: this state file holds list",
        None,
        lambda t: _sweep_folder(t, "{}", "[]"),
        output=False,
    ),
    Case(
        "resume-corrupt-run-json",
        [R, "{spec}"],
        r"out/run\.json: this state file cannot be read \(Expecting value\)",
        SMOKE,
        _corrupt_run_json,
    ),
    Case(
        "resume-corrupt-sweep-json",
        [R, "{spec}"],
        r"out/sweep\.json: this state file holds list",
        SWEEP,
        _corrupt_sweep_json,
    ),
    Case(
        "output-dir-of-another-spec-run",
        [R, "{spec}"],
        r"output_dir: .*/out holds a run of a different spec .*--set output_dir=PATH.*remove",
        SMOKE,
        _another_specs_run,
    ),
    Case(
        "output-dir-of-another-spec-train",
        [T, "{spec}"],
        r"output_dir: .*/out holds a run of a different spec",
        SMOKE,
        _another_specs_run,
    ),
    Case(
        "output-dir-of-a-run-for-a-sweep",
        [R, "{spec}"],
        r"output_dir: .*/out holds a run of a different spec \(it holds run\.json; this is a sweep\)",
        SWEEP,
        _a_single_runs_folder,
    ),
    # 7. a refusal after the outputs are resolved leaves no folder behind
    Case(
        "tracking-uri-scheme-run",
        [R, "{spec}", "--set", "tracking.uri=ftp://example"],
        r"tracking\.uri: got 'ftp://example'",
    ),
    Case(
        "tracking-uri-scheme-train",
        [T, "{spec}", "--set", "tracking.uri=ftp://example"],
        r"tracking\.uri: got 'ftp://example'",
    ),
]


def _files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def _setup(case: Case, tmp: Path) -> list[str]:
    """Write the case's spec and files into ``tmp``; its command line, filled in."""
    spec = tmp / "spec.yaml"
    if isinstance(case.spec, bytes):
        spec.write_bytes(case.spec)
    elif case.spec is not None:
        spec.write_text(case.spec)
    if case.prepare is not None:
        case.prepare(tmp)
    args = [arg.replace("{spec}", str(spec)).replace("{tmp}", str(tmp)) for arg in case.args]
    return [*args, "--set", f"output_dir={tmp / 'out'}"] if case.output else args


def _check(case: Case, exit_code: int, output: str, tmp: Path, before: set[str]) -> None:
    errors = [line for line in output.splitlines() if line.lstrip().startswith("error:")]
    assert exit_code == 2, output[-3000:]
    assert len(errors) == 1, output[-3000:]
    assert re.search(case.expected, errors[0]), errors[0][:3000]
    assert len(errors[0]) <= 2100, "an error line quotes at most a bounded amount of the input"
    assert "Traceback" not in output, output[-3000:]
    assert _files(tmp) == before, f"nothing may be written: {sorted(_files(tmp) - before)}"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_input_is_one_error_line_and_nothing_written(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = _setup(case, tmp_path)
    before = _files(tmp_path)
    result = RUNNER.invoke(app, args, env=case.env)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    _check(case, result.exit_code, result.output, tmp_path, before)
    assert not ray.is_initialized(), "a refused job starts nothing"


SUBPROCESS = [
    "alias-bomb-validate",
    "alias-bomb-run",
    "duplicate-section",
    "inf-set",
    "inf-file",
    "binary-file",
    "deep-flow",
    "set-open-bracket",
    "set-at-sign",
    "workers-million-run",
    "submit-address-garbage",
    "analyze-truncated-parquet",
    "resume-corrupt-run-json",
    "tracking-uri-scheme-run",
]


@pytest.mark.parametrize("name", SUBPROCESS)
def test_hostile_input_through_the_installed_command_line(name: str, tmp_path: Path) -> None:
    """The same cases through ``python -m memel`` in a fresh interpreter: stdout and stderr together."""
    case = next(case for case in CASES if case.name == name)
    args = _setup(case, tmp_path)
    before = _files(tmp_path)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), os.environ.get("PYTHONPATH", "")]),
        "COLUMNS": "120",
    }
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "memel", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    _check(case, done.returncode, done.stdout + done.stderr, tmp_path, before)


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 50 and len({case.name for case in CASES}) == len(CASES)


def test_a_bound_alias_use_still_loads(tmp_path: Path) -> None:
    """Aliases and merge keys within the bound keep working (only an expansion past it is refused)."""
    from memel.orchestration import load_job

    spec = tmp_path / "job.yaml"
    spec.write_text("name: anchors\ntrain: {steps: &n 7, log_every: *n}\n")
    job = load_job(spec)
    assert job.train.steps == 7 and job.train.log_every == 7
    spec.write_text("name: anchors\ncheckpoint: &base {every: 9}\neval: {<<: *base, batches: 1}\n")
    job = load_job(spec)
    assert job.checkpoint.every == 9 and job.eval.every == 9 and job.eval.batches == 1


def test_a_cluster_without_the_workers_resources_is_refused(tmp_path: Path) -> None:
    """On a real Ray (1 CPU), a run asking for 2 workers is refused after a bounded wait, naming
    train.workers, what was asked and what the cluster has; 1 worker passes. Fresh interpreter."""
    script = tmp_path / "check.py"
    script.write_text(
        "import ray, time\n"
        "from memel.errors import ConfigError\n"
        "from memel.training import load_spec\n"
        "from memel.training.preflight import check_cluster\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False, _node_ip_address='127.0.0.1')\n"
        "try:\n"
        "    started = time.monotonic()\n"
        "    check_cluster(load_spec(None, ['train.workers=2', 'train.global_batch_size=16', 'train.micro_batch_size=8']), 'auto', wait_s=2)\n"
        "    print('accepted')\n"
        "except ConfigError as error:\n"
        "    print(f'refused after {time.monotonic() - started:.1f} s: {error}')\n"
        "check_cluster(load_spec(None, ['train.workers=1']), 'auto', wait_s=2)\n"
        "print('one worker fits')\n"
        "ray.shutdown()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    match = re.search(r"refused after ([\d.]+) s: (.*)", done.stdout)
    assert match, done.stdout
    assert 2.0 <= float(match[1]) < 10.0, "the wait is bounded by wait_s"
    assert re.search(r"train\.workers: 2 workers ask for 2 CPU, the cluster has 1 CPU \(waited 2 s\)", match[2]), match[
        2
    ]
    assert "one worker fits" in done.stdout


@pytest.mark.parametrize(
    "address", ["http://127.0.0.1:8265", "https://head.example", "ray://head:10001", "head:8265", "auto"]
)
def test_cluster_addresses_in_every_usual_form_are_accepted(address: str) -> None:
    from memel.submission.client import check_address

    assert check_address(address) == address
