"""The command line's help and ``memel validate`` start without the heavy libraries: torch, Ray,
MLflow, DeepSpeed, Optuna and pyarrow load only in the commands that use them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "mlflow", "deepspeed", "optuna", "pyarrow")

#: Runs ``memel ARGS...`` in this interpreter and prints the exit code and the heavy modules loaded.
PROBE = """
import json, sys
from typer.testing import CliRunner
from memel.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
print(json.dumps({"exit": result.exit_code, "output": result.output,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)}))
""".replace("HEAVY", repr(HEAVY))


def _loaded(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _commands() -> list[list[str]]:
    """Every command and sub-command path, from the Click tree Typer builds."""
    import typer.main

    from memel.cli import app

    found: list[list[str]] = []

    def walk(group: object, path: list[str]) -> None:
        for name, command in getattr(group, "commands", {}).items():
            found.append([*path, name])
            walk(command, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


def test_help_of_every_command_loads_no_heavy_library() -> None:
    commands = _commands()
    assert ["validate"] in commands and ["bench", "throughput"] in commands and len(commands) > 15
    for args in ([], *commands):
        probe = _loaded(*args, "--help")
        assert probe["exit"] == 0, (args, probe["output"])
        assert probe["loaded"] == [], f"memel {' '.join(args)} --help imported {probe['loaded']}"


@pytest.mark.parametrize("job", ["jobs/smoke.yaml", "jobs/quickstart.yaml", "jobs/tune_memel.yaml"])
def test_validate_loads_no_heavy_library(job: str) -> None:
    probe = _loaded("validate", job)
    assert probe["exit"] == 0 and "valid" in probe["output"], probe["output"]
    assert probe["loaded"] == [], f"memel validate {job} imported {probe['loaded']}"


def test_validate_refuses_a_bad_model_without_torch(tmp_path: Path) -> None:
    """The model ladder and its presets are checked without building a model."""
    probe = _loaded("validate", "jobs/smoke.yaml", "--set", "model.name=pythia-nope")
    assert probe["exit"] == 2 and "unknown name 'pythia-nope'" in probe["output"], probe["output"]
    assert probe["loaded"] == []


def test_library_api_still_loads_on_use() -> None:
    code = "import sys, memel; assert 'torch' not in sys.modules; memel.inhibit; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    import memel
    import memel.inhibition

    assert memel.inhibition.sync is memel.sync and callable(memel.sync)
    assert {"inhibit", "snapshot", "InhibitionConfig"} <= set(dir(memel))
