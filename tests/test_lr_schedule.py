"""The lr schedule: warmup and cosine decay against torch's own schedulers, and its place in the spec."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from memel.errors import ConfigError
from memel.training import load_spec
from memel.training.lr_schedule import build_scheduler, lr_factor

SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "smoke.yaml"


def _lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    """The lr each of ``steps`` optimizer steps uses."""
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def _optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize(("warmup", "total", "min_ratio"), [(0, 50, 0.1), (10, 60, 0.0), (5, 7, 0.3)])
def test_cosine_follows_torchs_cosine_annealing_after_a_linear_warmup(
    warmup: int, total: int, min_ratio: float
) -> None:
    lr = 3e-3
    ours = [lr * lr_factor(s, warmup=warmup, total=total, schedule="cosine", min_ratio=min_ratio) for s in range(total)]

    # torch: LinearLR for the warmup, then CosineAnnealingLR reaching eta_min at the last step
    optimizer = _optimizer(lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - 1 - warmup, eta_min=min_ratio * lr)
    if warmup:
        ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup - 1)
        scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
    else:
        scheduler = cosine
    assert ours == pytest.approx(_lrs(scheduler, optimizer, total), rel=1e-9, abs=1e-15)
    assert ours[-1] == pytest.approx(min_ratio * lr) and max(ours) == pytest.approx(lr)
    after = ours[warmup:]
    assert all(a >= b for a, b in zip(after, after[1:])), "the decay never rises"


def test_constant_keeps_the_lr_after_warmup_and_needs_no_scheduler_without_one() -> None:
    factors = [lr_factor(s, warmup=4, total=20, schedule="constant", min_ratio=0.1) for s in range(20)]
    assert factors == [0.25, 0.5, 0.75] + [1.0] * 17
    assert build_scheduler(_optimizer(1.0), load_spec(SMOKE).train) is None


def test_the_scheduler_resumes_its_curve_from_a_saved_state() -> None:
    """A run resumed from a checkpoint continues the schedule where it stopped (DeepSpeed saves the
    scheduler's state with each checkpoint)."""
    train = load_spec(SMOKE, ["train.lr_schedule=cosine", "train.warmup_steps=3", "train.steps=20"]).train
    whole_opt = _optimizer(train.lr)
    whole = _lrs(build_scheduler(whole_opt, train), whole_opt, 20)

    first_opt = _optimizer(train.lr)
    first = build_scheduler(first_opt, train)
    head = _lrs(first, first_opt, 8)
    second_opt = _optimizer(train.lr)
    second = build_scheduler(second_opt, train)
    second.load_state_dict(first.state_dict())
    second_opt.param_groups[0]["lr"] = first_opt.param_groups[0]["lr"]  # the optimizer's state, restored with it
    assert head + _lrs(second, second_opt, 12) == pytest.approx(whole, rel=1e-12)


def test_the_schedule_is_part_of_the_run_name_only_when_it_decays() -> None:
    plain = load_spec(SMOKE)
    assert plain.train.lr_schedule == "constant"
    assert load_spec(SMOKE, ["train.min_lr_ratio=0.5"]).run_name == plain.run_name, "no effect without decay"
    cosine = load_spec(SMOKE, ["train.lr_schedule=cosine"])
    assert cosine.run_name != plain.run_name
    assert load_spec(SMOKE, ["train.lr_schedule=cosine", "train.min_lr_ratio=0.5"]).run_name != cosine.run_name


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr_schedule=linear", r"train\.lr_schedule: .*'constant' or 'cosine'"),
        ("train.min_lr_ratio=1.5", r"train\.min_lr_ratio"),
        ("train.min_lr_ratio=-0.1", r"train\.min_lr_ratio"),
    ],
)
def test_bad_schedules_fail_with_the_field(override: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_spec(SMOKE, [override])
