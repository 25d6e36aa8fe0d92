"""The memel CLI: help with examples on every command, and bad specs refused before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from memel.cli import app

RUNNER = CliRunner(env={"COLUMNS": "200"})
SMOKE = str(Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml")


@pytest.mark.parametrize(
    "command",
    [
        ["run"],
        ["validate"],
        ["tune"],
        ["train"],
        ["demo"],
        ["models"],
        ["bench", "inhibition"],
        ["bench", "overhead"],
        ["bench", "ddp"],
        ["bench", "parquet"],
    ],
)
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    result = RUNNER.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.zero_stage=5"], "train.zero_stage: .*0, 1, 2 or 3"),
        (["--set", "train.global_batch_size=6"], "does not divide across workers"),
        (
            ["--set", "tracking.uri=file:///tmp/x", "--address", "ray://10.0.0.1:10001"],
            "tracking.uri: .*local to this machine",
        ),
    ],
)
def test_train_refuses_bad_specs_before_starting(args: list[str], message: str, tmp_path: Path) -> None:
    result = RUNNER.invoke(app, ["train", SMOKE, "--set", f"output_dir={tmp_path / 'out'}", *args])
    assert result.exit_code == 2, result.output
    import re

    assert re.search(message, " ".join(result.output.split())), result.output
    assert not (tmp_path / "out").exists(), "nothing may be written for a refused spec"


@pytest.mark.parametrize("key", ["inhibition.shard_statistics", "inhibition.execution.shard_statistics"])
def test_validate_accepts_sharded_statistics_and_names_a_bad_value(key: str) -> None:
    accepted = RUNNER.invoke(app, ["validate", SMOKE, "--set", f"{key}=true"])
    assert accepted.exit_code == 0, accepted.output
    refused = RUNNER.invoke(app, ["validate", SMOKE, "--set", f"{key}=maybe"])
    assert refused.exit_code == 2, refused.output
    assert "shard_statistics" in refused.output and "valid boolean" in refused.output


def test_a_finished_trial_shows_the_metric_its_study_optimizes() -> None:
    from memel.commands.tune import _outcome

    metrics = {"heldout/b_mse": 1833.22, "eval/loss": 0.0605, "heldout/loss": 0.06}
    assert _outcome(metrics, "heldout/b_mse") == "heldout/b_mse 1833, eval/loss 0.0605"
    assert _outcome(metrics, "eval/loss") == "eval/loss 0.0605"
    assert _outcome({}, "heldout/accuracy") == "heldout/accuracy nan, eval/loss nan"
