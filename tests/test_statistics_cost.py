"""The statistics cost model against real Inhibitors: neurons, bytes held, bytes all-reduced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import memel
from memel.benchmarks.statistics_cost import (
    PAYLOAD_BYTES,
    SHARDED_CALL_BYTES,
    STATE_BYTES,
    TOKENS_PER_STEP,
    measured_state_bytes,
    statistics_cost,
)
from memel.models import build, get_config, preset_targets
from tests.distributed import run_distributed

CASES = [("byte-0.2m", 64), ("byte-2l-d16", 32), ("bert-tiny", 24), ("vit-micro", 0)]


def _inputs(name: str, seq_len: int, batch: int = 3) -> torch.Tensor:
    config = get_config(name)
    if hasattr(config, "image_size"):
        return torch.randn(batch, config.in_channels, config.image_size, config.image_size)
    return torch.randint(0, 250, (batch, seq_len))


def _train_step(model: torch.nn.Module, name: str, seq_len: int) -> None:
    out = model(_inputs(name, seq_len))
    (out[0] if isinstance(out, tuple) else out).float().pow(2).mean().backward()
    memel.sync(model)


@pytest.mark.parametrize("layout", ["element", "channel"])
@pytest.mark.parametrize("preset", ["paper", "mlp"])
@pytest.mark.parametrize(("name", "seq_len"), CASES)
def test_modelled_neurons_are_the_inhibitors_neurons(name: str, seq_len: int, preset: str, layout: str) -> None:
    cost = statistics_cost(name, layout, preset, seq_len)
    torch.manual_seed(0)
    model = build(name)
    inserted = memel.inhibit(model, preset_targets(name, preset), memel.InhibitionConfig(mode="rd", layout=layout))
    _train_step(model, name, seq_len)
    assert cost.module_neurons == {target: module.neurons for target, module in inserted.items()}
    assert cost.state_bytes == cost.neurons * sum(size for _, size in STATE_BYTES)


@pytest.mark.parametrize(("name", "seq_len"), CASES[:2])
def test_modelled_state_bounds_what_a_trained_inhibitor_holds_within_ten_percent(name: str, seq_len: int) -> None:
    cost = statistics_cost(name, "element", "paper", seq_len)
    model = build(name)
    inserted = memel.inhibit(model, preset_targets(name, "paper"), memel.InhibitionConfig(mode="rd", layout="element"))
    for _ in range(3):
        _train_step(model, name, seq_len)
    held = sum(measured_state_bytes(module) for module in inserted.values())
    assert 0.9 * cost.state_bytes <= held <= cost.state_bytes


def test_the_pythia_neurons_follow_from_the_shapes_alone() -> None:
    cost = statistics_cost("pythia-2.8b", "element", "paper", 2048)
    assert cost.positions == 2048
    assert cost.module_neurons == {f"layers.{i}": 2048 * 2560 for i in (14, 15, 16, 17)}
    assert cost.parameters == 2_775_208_960
    assert cost.payload_bytes == 4 * 2048 * 2560 * 24
    # 8 GPUs on a 450 GB/s ring: 2 * 7/8 of the payload per GPU
    assert cost.reduce_seconds(8, 450e9) == pytest.approx(2 * 7 / 8 * cost.payload_bytes / 450e9)
    channel = statistics_cost("pythia-2.8b", "channel", "paper", 2048)
    assert channel.neurons == 4 * 2560
    assert statistics_cost("byte-0.2m", "element", "paper", 4096).positions == get_config("byte-0.2m").context_length


def _count_reduced_bytes(rank: int, world: int, out: Path) -> None:
    torch.manual_seed(rank)
    model = build("byte-0.2m")
    memel.inhibit(model, preset_targets("byte-0.2m", "paper"), memel.InhibitionConfig(mode="rd", layout="element"))
    out_ = model(_inputs("byte-0.2m", 48))
    out_.float().pow(2).mean().backward()
    reduced = 0
    original = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: object, **kwargs: object) -> object:
        nonlocal reduced
        reduced += tensor.numel() * tensor.element_size()
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        memel.sync(model)
    finally:
        dist.all_reduce = original
    (out / f"rank{rank}.json").write_text(json.dumps({"reduced": reduced}))


def test_modelled_payload_is_what_two_ranks_all_reduce_per_step(tmp_path: Path) -> None:
    run_distributed(_count_reduced_bytes, 2, tmp_path)
    cost = statistics_cost("byte-0.2m", "element", "paper", 48)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text())["reduced"] == cost.payload_bytes
    assert cost.payload_bytes == cost.neurons * PAYLOAD_BYTES


def test_memel_models_shows_the_cost_per_model() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "memel", "models", "--family", "decoder", "--stats", "--layout", "channel"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        check=True,
    ).stdout
    row = next(line for line in shown.splitlines() if "pythia-2.8b" in line)
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    # positions, neurons (4 modules x 2,560 channels), 104 B each, % of 2 x 2.78B bytes, 24 B each
    assert cells[4:] == ["2048", "10.2K", "1.06 MB", "0.0", "246 KB"]


LADDER_BOUNDS = ["pythia-410m", "pythia-1b", "pythia-1.4b", "pythia-2.8b"]


@pytest.mark.parametrize("name", LADDER_BOUNDS)
def test_sharded_statistics_meet_the_bounds_at_the_middle_rungs(name: str) -> None:
    """Sharded over 8 ranks, the element layout's state per rank is at most 10% of the bf16
    parameters and its communication at most 1% of the modelled step, at both batch sizes;
    replicated it is not."""
    replicated = statistics_cost(name, "element", "paper", 2048)
    sharded = statistics_cost(name, "element", "paper", 2048, shard_ranks=8)
    assert replicated.state_fraction > 0.1
    assert sharded.state_fraction <= 0.1
    assert sharded.state_bytes == sum(-(-n // 8) for n in sharded.module_neurons.values()) * 68
    assert sharded.payload_bytes == sharded.neurons * sum(size for _, size in SHARDED_CALL_BYTES)
    for tokens in (TOKENS_PER_STEP, 8 * 8 * 2048):
        assert sharded.reduce_fraction(8, tokens) <= 0.01
    # one reduce-scatter and one all-gather per call: 7/8 of the payload per GPU each call,
    # 16 calls of 8 x 8 sequences in Pythia's step of 1,024 sequences
    assert sharded.reduce_seconds(8, 450e9) == pytest.approx(7 / 8 * sharded.payload_bytes / 450e9)
    assert sharded.calls_per_step(8, TOKENS_PER_STEP, 8) == 16


def _count_sharded_call(rank: int, world: int, out: Path) -> None:
    from memel.inhibition import collectives

    torch.manual_seed(rank)
    model = build("byte-0.2m")
    config = memel.InhibitionConfig(mode="rd", layout="element", shard_statistics=True, late_start=0)
    inserted = memel.inhibit(model, preset_targets("byte-0.2m", "paper"), config)
    _train_step(model, "byte-0.2m", 48)  # the first call: moments only
    moved = 0
    scatter, gather = collectives._REDUCE_SCATTER, collectives._ALL_GATHER

    def counting_scatter(output: torch.Tensor, input_: torch.Tensor, **kwargs: object) -> object:
        nonlocal moved
        moved += input_.numel() * input_.element_size()
        return scatter(output, input_, **kwargs)

    def counting_gather(output: torch.Tensor, input_: torch.Tensor, **kwargs: object) -> object:
        nonlocal moved
        moved += output.numel() * output.element_size()
        return gather(output, input_, **kwargs)

    collectives._REDUCE_SCATTER, collectives._ALL_GATHER = counting_scatter, counting_gather
    try:
        out_ = model(_inputs("byte-0.2m", 48))  # a measured, tracked call of every module
    finally:
        collectives._REDUCE_SCATTER, collectives._ALL_GATHER = scatter, gather
    out_.float().pow(2).mean().backward()
    memel.sync(model)
    held = sum(measured_state_bytes(module) for module in inserted.values())
    (out / f"rank{rank}.json").write_text(json.dumps({"moved": moved, "held": held, "modules": len(inserted)}))


def test_modelled_sharded_state_and_payload_are_what_two_ranks_hold_and_move(tmp_path: Path) -> None:
    """byte-0.2m in the element layout on 2 gloo ranks with sharded statistics: each rank holds
    exactly the modelled sharded state, and one training call moves the modelled payload (plus
    the 4 float64 numbers each rank adds per module for the numbers every rank needs)."""
    run_distributed(_count_sharded_call, 2, tmp_path)
    cost = statistics_cost("byte-0.2m", "element", "paper", 48, shard_ranks=2)
    for rank in range(2):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert measured["held"] == cost.state_bytes
        assert measured["moved"] == cost.payload_bytes + measured["modules"] * 2 * 4 * 8


def test_memel_models_shows_the_sharded_cost() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "memel", "models", "--family", "decoder", "--stats", "--shard-ranks", "8"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        check=True,
    ).stdout
    assert "moved/call" in shown
    row = next(line for line in shown.splitlines() if "pythia-410m" in line)
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    # 4 x 2,048 x 1,024 neurons, 68 B per neuron of an eighth, 52 B per neuron per call
    assert cells[4:] == ["2048", "8.39M", "71.3 MB", "8.8", "436 MB"]
