"""``memel bench ddp``'s arithmetic on constructed step times; its DDP and DeepSpeed loops really run
under torchrun, the DeepSpeed loop also beside a real idle Ray instance; ZeRO-2's whole-bucket
all-reduce on CPU gives DeepSpeed's reduce-scatter's weights."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from memel.benchmarks.ddp import TRAIN_HELPER_ACTORS, _ddp_times, compare, idle_ray
from memel.training import load_spec

ROOT = Path(__file__).resolve().parents[1]


def test_the_ratio_is_taken_over_the_steps_both_sides_timed_after_the_first_fifth() -> None:
    memel = {"steps": list(range(1, 11)), "seconds": [9.0, 9.0] + [0.02 * s for s in range(3, 11)]}
    ddp = {"steps": list(range(1, 11)), "seconds": [5.0, 5.0] + [0.01 * s for s in range(3, 10)]}  # step 10 untimed
    row = compare("m", 2, memel, ddp)
    steps = range(3, 10)  # after step 10 // 5 = 2, timed by both
    assert row.steps == len(steps)
    assert row.memel_median_ms == pytest.approx(1000 * statistics.median(0.02 * s for s in steps))
    assert row.ddp_median_ms == pytest.approx(1000 * statistics.median(0.01 * s for s in steps))
    assert row.ratio == pytest.approx(0.5) and row.mean_ratio == pytest.approx(0.5)
    assert row.deepspeed_median_ms is None and row.deepspeed_ratio is None
    with pytest.raises(ValueError, match="no common step"):
        compare("m", 2, memel, {"steps": [1, 2], "seconds": [1.0, 1.0]})
    engine = {"steps": list(range(1, 9)), "seconds": [0.015 * s for s in range(1, 9)]}  # steps 9 and 10 untimed
    row = compare("m", 2, memel, ddp, engine)
    steps = range(3, 9)
    assert row.steps == len(steps)
    assert row.deepspeed_median_ms == pytest.approx(1000 * statistics.median(0.015 * s for s in steps))
    assert row.deepspeed_ratio == pytest.approx(0.75) and row.ratio == pytest.approx(0.5)


def test_the_ray_floor_and_ceiling_are_taken_over_the_engine_beside_ray_on_the_same_steps() -> None:
    memel = {"steps": list(range(1, 11)), "seconds": [0.04] * 10}
    ddp = {"steps": list(range(1, 11)), "seconds": [0.02] * 10}
    engine = {"steps": list(range(1, 11)), "seconds": [0.01 * s for s in range(1, 11)]}
    beside = {"steps": list(range(3, 9)), "seconds": [0.02 * s for s in range(3, 9)]}  # the fewest steps
    row = compare("m", 0, memel, ddp, engine, beside)
    steps = range(3, 9)
    assert row.steps == len(steps)
    assert row.deepspeed_median_ms == pytest.approx(1000 * statistics.median(0.01 * s for s in steps))
    assert row.beside_ray_median_ms == pytest.approx(1000 * statistics.median(0.02 * s for s in steps))
    assert row.ray_floor == pytest.approx(0.5) and row.ratio == pytest.approx(0.5)
    assert row.ceiling == pytest.approx(20 / row.beside_ray_median_ms)  # DDP's 20 ms over the engine beside Ray
    assert compare("m", 0, memel, ddp, engine).ray_floor is None
    with pytest.raises(ValueError, match="DeepSpeed loop"):
        compare("m", 0, memel, ddp, None, beside)


def test_the_deepspeed_loop_runs_beside_an_idle_ray_instance_that_is_gone_after(tmp_path: Path) -> None:
    import os

    import psutil
    import ray

    spec = load_spec(str(ROOT / "jobs" / "smoke.yaml"), ["train.steps=4", "train.log_every=2"])
    with idle_ray() as pids:
        assert ray.is_initialized()
        assert len(set(pids)) == TRAIN_HELPER_ACTORS and os.getpid() not in pids
        assert all(psutil.pid_exists(pid) for pid in pids)
        times = _ddp_times(spec, tmp_path / "beside-ray", "deepspeed")  # a folder not made yet
        assert all(psutil.pid_exists(pid) for pid in pids), "Ray's actors ran beside the whole loop"
    assert times["steps"] == [2, 3, 4] and all(seconds > 0 for seconds in times["seconds"])
    assert not ray.is_initialized()
    gone = psutil.wait_procs([psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)], timeout=30)[1]
    assert not gone, "the idle actors outlived the instance"


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_the_loop_runs_under_torchrun_and_times_every_step(tmp_path: Path, engine: str) -> None:
    spec = load_spec(str(ROOT / "jobs" / "smoke.yaml"), ["train.steps=4", "train.log_every=2"])
    times = _ddp_times(spec, tmp_path, engine)
    assert times["steps"] == [2, 3, 4] and len(times["seconds"]) == 3  # each from the end of the step before
    assert all(seconds > 0 for seconds in times["seconds"])


def _train_zero2(rank: int, world: int, folder: str) -> None:
    """Six ZeRO-2 steps of the smoke model with DeepSpeed's per-partition reduction and with memel's
    CPU default (whole buckets all-reduced); rank 0 saves both final weights."""
    import os

    import deepspeed
    import torch

    from memel.data import build as build_loader
    from memel.models import build as build_model
    from memel.training.deepspeed_config import deepspeed_config
    from memel.training.objective import compute
    from memel.training.worker import insert_inhibition

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    spec = load_spec(str(ROOT / "jobs" / "smoke.yaml"))
    weights = {}
    for reduce_scatter in (True, False):
        torch.manual_seed(0)
        model = build_model(spec.model.name, **spec.model.overrides)
        insert_inhibition(model, spec)
        weights["initial"] = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.lr, weight_decay=spec.train.weight_decay)
        loader = build_loader({**spec.data, "batch_size": spec.train.micro_batch_size, "seed": 0}, rank, world)
        config = deepspeed_config(spec)
        assert config["zero_optimization"]["reduce_scatter"] is False, "memel's CPU default"
        config["zero_optimization"]["reduce_scatter"] = reduce_scatter
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        for _ in range(6 * spec.train.accumulation):
            out = compute(engine, next(loader), "text_lm", torch.device("cpu"))
            engine.backward(out.loss)
            engine.step()
        weights[str(reduce_scatter)] = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    if rank == 0:
        torch.save(weights, Path(folder) / "weights.pt")


def test_zero2_on_cpu_all_reducing_whole_buckets_trains_the_same_weights(tmp_path: Path) -> None:
    import torch
    from distributed import run_distributed

    run_distributed(_train_zero2, 2, str(tmp_path))
    weights = torch.load(tmp_path / "weights.pt")
    assert (weights["True"] - weights["initial"]).abs().max() > 1e-3, "training moved the weights"
    apart = (weights["True"] - weights["False"]).abs().max()
    assert apart <= 1e-6 * weights["True"].abs().max(), float(apart)


def test_the_command_passes_ray_floor_on_and_prints_and_saves_the_floor_and_ceiling(
    tmp_path: Path, monkeypatch
) -> None:
    """The command's wiring only (the measured sides are those of the tests above): the flag reaches
    every row, and the table, progress line and JSON carry the floor and ceiling ``compare`` computed."""
    import json

    from typer.testing import CliRunner

    import memel.benchmarks.ddp as ddp
    from memel.cli import app

    seconds = {"memel": 0.04, "ddp": 0.03, "deepspeed": 0.035, "beside": 0.038}
    asked = []

    def measured(spec, ray_floor=False):
        asked.append(ray_floor)
        side = {name: {"steps": list(range(1, 11)), "seconds": [value] * 10} for name, value in seconds.items()}
        return compare(
            spec.model.name,
            spec.train.zero_stage,
            side["memel"],
            side["ddp"],
            side["deepspeed"],
            side["beside"] if ray_floor else None,
        )

    monkeypatch.setattr(ddp, "bench_ddp", measured)
    out = tmp_path / "rows.json"
    args = ["bench", "ddp", str(ROOT / "jobs" / "smoke.yaml"), "--zero", "0", "--zero", "2", "--json", str(out)]
    shown = CliRunner(env={"COLUMNS": "200"}).invoke(app, [*args, "--ray-floor"])
    assert shown.exit_code == 0, shown.output
    assert asked == [True, True]
    floor, ceiling = 0.035 / 0.038, 0.03 / 0.038
    assert "Ray floor" in shown.output and "ceiling" in shown.output
    assert f"Ray floor {floor:.3f}, ceiling {ceiling:.3f}" in shown.output
    rows = json.loads(out.read_text())["rows"]
    assert [row["zero_stage"] for row in rows] == [0, 2]
    assert all(row["ray_floor"] == pytest.approx(floor) and row["ceiling"] == pytest.approx(ceiling) for row in rows)

    plain = CliRunner(env={"COLUMNS": "200"}).invoke(app, args)
    assert plain.exit_code == 0 and asked[-2:] == [False, False]
    assert "Ray floor" not in plain.output and json.loads(out.read_text())["rows"][0]["ray_floor"] is None
