"""loss_flattened on constructed loss curves with a known answer: a curve that has reached its
floor passes (also under evaluation noise), one still falling fails, and the numbers behind the
verdict match a hand computation of the tail's least-squares line; a member's fixed-sample curve
scores every retained checkpoint on the same held-out batches, checked against a direct computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memel.analysis.convergence import loss_flattened

STEPS = np.arange(200, 4001, 200)


def test_a_flat_tail_passes() -> None:
    losses = 1.5 + 1.2 * np.exp(-STEPS / 400.0)  # at its floor well before the last quarter
    result = loss_flattened(STEPS, losses)
    assert result.flattened
    assert 0 <= result.relative < 0.01


def test_a_falling_tail_fails() -> None:
    losses = 1.5 + 1.2 * np.exp(-STEPS / 4000.0)  # still falling at the end
    result = loss_flattened(STEPS, losses)
    assert not result.flattened
    assert result.relative > 0.1
    linear = loss_flattened(STEPS, 3.0 - 1e-4 * STEPS)  # a straight line: the tail is a quarter of the drop
    assert not linear.flattened and linear.relative == pytest.approx(0.25)


def test_evaluation_noise_does_not_flip_the_verdicts() -> None:
    rng = np.random.default_rng(0)
    flat = [
        loss_flattened(STEPS, 1.5 + 1.2 * np.exp(-STEPS / 400.0) + rng.normal(0, 0.01, len(STEPS))) for _ in range(50)
    ]
    falling = [
        loss_flattened(STEPS, 1.5 + 1.2 * np.exp(-STEPS / 4000.0) + rng.normal(0, 0.01, len(STEPS))) for _ in range(50)
    ]
    assert sum(r.flattened for r in flat) >= 45
    assert not any(r.flattened for r in falling)


def test_the_numbers_match_a_hand_computed_line() -> None:
    steps = np.array([100, 200, 300, 400, 500, 600, 700, 800])
    losses = np.array([3.0, 2.5, 2.2, 2.1, 2.05, 2.02, 2.03, 2.0])
    result = loss_flattened(steps, losses, tail=0.5, threshold=0.1)
    # the tail is steps >= 800 - 0.5 * 700 = 450: 500, 600, 700, 800
    x, y = steps[4:].astype(float), losses[4:]
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    end = y.mean() + slope * (800 - x.mean())
    assert result.tail_points == 4 and result.tail_start == 450 and result.last_step == 800
    assert result.tail_drop == pytest.approx(-slope * 350)
    assert result.total_drop == pytest.approx(3.0 - end)
    assert result.relative == pytest.approx(-slope * 350 / (3.0 - end))
    assert result.flattened == (result.relative < 0.1)


def test_unsorted_points_and_nans_are_handled_and_a_curve_that_never_fell_is_not_flattened() -> None:
    losses = 1.5 + 1.2 * np.exp(-STEPS / 400.0)
    order = np.random.default_rng(1).permutation(len(STEPS))
    with_nan = np.append(losses[order], math.nan)
    assert loss_flattened(np.append(STEPS[order], 5000), with_nan) == loss_flattened(STEPS, losses)
    rising = loss_flattened(STEPS, 2.0 + 1e-5 * STEPS)
    assert not rising.flattened and math.isnan(rising.relative)


@pytest.mark.parametrize(
    ("steps", "losses", "kwargs", "message"),
    [
        ([1, 2, 3], [1.0, 2.0], {}, "one length"),
        ([100, 200, 300, 400], [3.0, 2.0, 1.5, 1.4], {}, "need 3"),
        (STEPS, STEPS * 0.0, {"tail": 0.0}, "tail must be"),
        (STEPS, STEPS * 0.0, {"threshold": 0.0}, "threshold > 0"),
        ([math.nan], [math.nan], {}, "no finite"),
    ],
)
def test_bad_input_is_refused(steps, losses, kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        loss_flattened(steps, losses, **kwargs)


# ------------------------------------------------------------------ a member's fixed-sample curve
def _save_checkpoint(folder: Path, model: torch.nn.Module, step: int) -> None:
    """A ZeRO-0 memel checkpoint folder of ``model`` at ``step`` (the layout load_host_weights reads)."""
    tag = folder / f"step-{step:09d}"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    (folder / "memel").mkdir()
    (folder / "memel" / "progress.json").write_text(json.dumps({"step": step, "tag": tag.name}))


def test_checkpoint_curve_scores_every_retained_checkpoint_on_one_fixed_sample(tmp_path: Path) -> None:
    from memel.analysis.checkpoint_curve import checkpoint_losses, spread_batches
    from memel.analysis.source import member_from_spec
    from memel.models import build
    from memel.training import TrainSpec

    spec = TrainSpec(
        name="curve",
        model={"name": "byte-2l-d16"},
        data={"kind": "text_lm", "corpus": "mixed", "seq_len": 32},
        train={"micro_batch_size": 4, "global_batch_size": 4, "workers": 1},
    )
    models = []
    for step, seed in ((600, 1), (200, 0), (400, 2)):  # written out of order; 200 and 600 differ
        torch.manual_seed(seed)
        models.append((step, build("byte-2l-d16")))
        _save_checkpoint(tmp_path / f"checkpoint_{step}", models[-1][1], step)
    member = member_from_spec(
        "run-c", spec.model_dump(mode="json"), "m", {"checkpoint": str(tmp_path / "checkpoint_600")}
    )
    steps, losses = checkpoint_losses(member, batches=3)
    assert steps == [200, 400, 600]
    sample = spread_batches(spec.data, 4, 3)
    assert len(sample) == 3
    for (step, model), loss in zip(sorted(models, key=lambda pair: pair[0]), losses, strict=True):
        model.eval()
        with torch.no_grad():  # independent: the mean next-byte cross-entropy over every target byte
            total = sum(
                F.cross_entropy(model(b.inputs).double().flatten(0, 1), b.targets.flatten(), reduction="sum").item()
                for b in sample
            )
        assert loss == pytest.approx(total / sum(b.targets.numel() for b in sample), rel=1e-5), step
    assert len(set(losses)) == 3
    first = spread_batches(spec.data, 4, 3)[0].inputs
    assert torch.equal(first, sample[0].inputs)  # the same sample every time


def test_members_whose_curves_cannot_be_judged_for_one_reason_share_one_note(monkeypatch) -> None:
    """A sweep of 40 fine-tunes evaluated once each gets one note naming the reason, not 40."""
    from types import SimpleNamespace

    from memel.analysis import pipeline

    short = ([150], [0.05])  # one evaluation: too few points in the tail
    curves = {f"m{i}": short for i in range(6)} | {"odd": ([10, 20, 30, 40], [1.0, float("nan"), 0.5, "x"])}

    def curve(member, options, client):
        steps, losses = curves[member.label]
        return "eval/loss", steps, losses

    monkeypatch.setattr(pipeline, "member_curve", curve)
    source = SimpleNamespace(tracking_uri=None, members=[SimpleNamespace(label=label) for label in curves])
    options = SimpleNamespace(flat_tail=0.25, flat_threshold=0.05)
    frame, notes = pipeline.run_convergence(source, options)
    assert frame.empty
    assert notes[0] == (
        "convergence: 6 members (m0, m1, m2, m3 and 2 more): the last 25% of the steps holds 1 evaluation(s); "
        "need 3 (evaluate more often or widen the tail)"
    )
    assert len(notes) == 2 and notes[1].startswith("convergence: odd: ")
