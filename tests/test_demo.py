"""The CPU demo (the README's main command until the Ray job lands), at reduced size."""

from __future__ import annotations

import math

from typer.testing import CliRunner

from memel.cli import app
from memel.demo import run_demo


def test_demo_trains_with_and_without_inhibition() -> None:
    results = run_demo("byte-0.2m", ("original", "rd"), steps=25, batch_size=4, seq_len=32)
    by_mode = {r.mode: r for r in results}
    assert by_mode["original"].inhibited == 0
    # late start is 10 batches: 15 inhibiting steps x 4*32 samples x 4 layers, top-1 each
    assert by_mode["rd"].inhibited == 15 * 4 * 32 * 4
    for result in results:
        assert math.isfinite(result.train_loss) and result.train_loss < math.log(256)
        assert result.mean_ms > 0 and result.max_ms >= result.mean_ms and 0 <= result.frac_above <= 1


def test_demo_command_prints_the_comparison() -> None:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(
        app,
        ["demo", "--steps", "12", "--batch-size", "2", "--seq-len", "16", "--mode", "original", "--mode", "naive_b"],
    )
    assert result.exit_code == 0, result.output
    assert "held-out loss" in result.output and "naive_b" in result.output
