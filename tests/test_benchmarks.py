"""The benchmark functions run end to end on tiny shapes (their figures are not asserted:
timing belongs in benchmarks, not tests), and measure what they say they measure."""

from __future__ import annotations

import time

import pytest
import torch

import memel
from memel.benchmarks.inhibition import bench_inhibition, warm_copy_available
from memel.benchmarks.overhead import ModuleClock, bench_overhead
from memel.inhibition.kernels import LogMSLoss, ReverseDeactivation


def test_bench_inhibition_rows_cover_every_layout_and_baseline() -> None:
    rows = bench_inhibition((2, 8, 16), top_ns=(1, 3), repeats=2, kernels=("native", "eager"))
    assert [(r.kernel, r.layout, r.top_n) for r in rows] == [
        (k, layout, n) for k in ("native", "eager") for layout in ("channel", "element") for n in (1, 3)
    ]
    for row in rows:
        assert row.module_ms > 0 and row.baseline_ms > 0 and row.ratio > 0
        if warm_copy_available():
            assert row.warm_ms is not None and row.warm_ms > 0 and row.warm_ratio is not None


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bench_overhead_module_share_counts_only_inhibitor_time() -> None:
    backward = {cls: cls.__dict__["backward"] for cls in (ReverseDeactivation, LogMSLoss)}
    rows = bench_overhead("byte-0.2m", batch=2, seq=16, rounds=2, warmup=2, variants=("none", "original", "rd", "l2e"))
    by_name = {row.variant: row for row in rows}
    assert set(by_name) == {"none", "original", "rd", "l2e"}
    assert by_name["none"].module_share == 0.0 and by_name["none"].ratio == 1.0
    for name in ("original", "rd", "l2e"):
        assert 0.0 < by_name[name].module_share < 1.0
    # the backward timers are removed again
    assert all(cls.__dict__["backward"] is original for cls, original in backward.items())


class _Sleep(torch.nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x * 1.0


def test_module_clock_counts_inhibitor_forwards_and_backwards_and_nothing_else() -> None:
    """A host module that sleeps 0.5 s is left out; 0.05 s spent inside the Inhibitor's forward
    and 0.05 s inside RD's backward are counted (sleep gives lower bounds that cannot flake)."""
    model = torch.nn.Sequential(_Sleep(0.5), torch.nn.Tanh())
    inserted = memel.inhibit(model, "1", memel.InhibitionConfig(mode="rd", late_start=1))
    model[1](torch.randn(4, 8))  # the history RD judges the timed call against
    clock = ModuleClock()
    clock.attach(model)
    inserted["1"].register_forward_pre_hook(lambda module, args: time.sleep(0.05))
    original = ReverseDeactivation.__dict__["backward"]

    def slow_backward(ctx: object, *grads: object) -> object:
        time.sleep(0.05)
        return original.__func__(ctx, *grads)

    ReverseDeactivation.backward = staticmethod(slow_backward)  # type: ignore[method-assign]
    try:
        with clock.timing_backwards():
            out = model(torch.randn(4, 8, requires_grad=True))
            out.sum().backward()
    finally:
        ReverseDeactivation.backward = original  # type: ignore[method-assign]
    assert int(inserted["1"].snapshot().inhibited_count.sum()) == 4  # RD ran: one value per sample
    assert 0.1 <= clock.total() < 0.5


@pytest.mark.parametrize("command", [["inhibition"], ["overhead", "--model", "byte-0.2m"]])
@pytest.mark.parametrize("device", ["cuda:99", "tpu"])
def test_bench_refuses_a_device_torch_cannot_use(command: list[str], device: str) -> None:
    from typer.testing import CliRunner

    from memel.cli import app

    result = CliRunner().invoke(app, ["bench", *command, "--device", device])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: device: got {device!r}"), result.output
    assert "Traceback" not in result.output


def test_bench_inhibition_json_holds_every_row(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from memel.cli import app

    path = tmp_path / "rows.json"
    args = [
        "bench",
        "inhibition",
        "--kernel",
        "eager",
        "--batch",
        "2",
        "--seq",
        "4",
        "--hidden",
        "16",
        "--top-n",
        "1",
        "--top-n",
        "2",
    ]
    result = CliRunner().invoke(app, [*args, "--repeats", "1", "--json", str(path)])
    assert result.exit_code == 0, result.output
    written = json.loads(path.read_text())
    assert written["device"] == "cpu" and written["shape"] == [2, 4, 16]
    assert [(r["kernel"], r["layout"], r["top_n"]) for r in written["rows"]] == [
        ("eager", layout, n) for layout in ("channel", "element") for n in (1, 2)
    ]
    assert all(r["module_ms"] > 0 and r["ratio"] > 0 for r in written["rows"])


def test_bench_throughput_times_each_model_and_refuses_a_non_decoder() -> None:
    from typer.testing import CliRunner

    from memel.benchmarks.throughput import bench_throughput
    from memel.cli import app
    from memel.models import count_parameters

    rows = bench_throughput(["byte-0.2m", "byte-2l-d16"], batch=2, seq=8, steps=2, warmup=1)
    assert [r.model for r in rows] == ["byte-0.2m", "byte-2l-d16"]
    assert rows[0].parameters == count_parameters("byte-0.2m") > rows[1].parameters
    assert all(0 < r.median_tokens_per_s <= r.best_tokens_per_s for r in rows)

    runner = CliRunner()
    result = runner.invoke(
        app,
        ["bench", "throughput", "--model", "byte-0.2m", "--batch", "2", "--seq", "8", "--steps", "1", "--warmup", "0"],
    )
    assert result.exit_code == 0, result.output
    assert "byte-0.2m" in result.output and "tokens/s (median step)" in result.output
    bad = runner.invoke(app, ["bench", "throughput", "--model", "vit-micro", "--steps", "1"])
    assert bad.exit_code == 2 and "error: --model: 'vit-micro' is not a decoder" in bad.output
    bad = runner.invoke(app, ["bench", "throughput", "--model", "byte-0.2m", "--seq", "999"])
    assert bad.exit_code == 2 and "error: --seq: 999 exceeds byte-0.2m's context of 256" in bad.output
