"""B-MSE / B-MAE against a hand computation, and the ConvGRU nowcaster's hookable cells."""

from __future__ import annotations

import pytest
import torch

import memel
from memel.models import HKO7_ZR, b_mae, b_mse, balancing_weights, build

# dBZ 20, 30, 35, 40, 50 under Marshall-Palmer (Z = 200 R^1.6) are R = 0.65, 2.73, 5.62,
# 11.5, 48.6 mm/h, so their weights are 1, 2, 5, 10, 30 (sum 48).
DBZ = torch.tensor([20.0, 30.0, 35.0, 40.0, 50.0], dtype=torch.float64)
PIXELS = (DBZ + 10.0) / 70.0


def _target(batch: int = 2, frames: int = 2) -> torch.Tensor:
    return PIXELS.view(1, 1, 1, 1, 5).expand(batch, frames, 1, 1, 5).clone()


def test_weights_by_hand() -> None:
    assert balancing_weights(PIXELS).tolist() == [1.0, 2.0, 5.0, 10.0, 30.0]
    # HKO-7's reference Z-R (a=58.53, b=1.56): dBZ 30 -> 6.2 mm/h (weight 5), dBZ 35 -> 13.1 (10).
    assert balancing_weights(PIXELS, zr=HKO7_ZR).tolist() == [1.0, 5.0, 10.0, 10.0, 30.0]


def test_b_mse_and_b_mae_by_hand() -> None:
    target = _target()
    delta = torch.zeros_like(target)
    delta[0] = 0.1  # sample 0: both frames off by 0.1
    delta[1, 0] = -0.2  # sample 1: frame 0 off by 0.2, frame 1 exact
    pred = target + delta
    # B-MSE: sample 0 = 2 frames * 48 * 0.01 = 0.96; sample 1 = 48 * 0.04 = 1.92.
    assert b_mse(pred, target).item() == pytest.approx((0.96 + 1.92) / 2)
    assert b_mse(pred, target, reduction="per_frame").tolist() == pytest.approx([(0.48 + 1.92) / 2, 0.48 / 2])
    assert b_mse(pred, target, reduction="frame_mean").item() == pytest.approx((1.2 + 0.24) / 2)
    # B-MAE: sample 0 = 2 * 48 * 0.1 = 9.6; sample 1 = 48 * 0.2 = 9.6.
    assert b_mae(pred, target).item() == pytest.approx(9.6)
    assert b_mae(pred, target, reduction="per_frame").tolist() == pytest.approx([7.2, 2.4])
    assert b_mae(pred, target, reduction="none").shape == target.shape
    mask = torch.ones_like(target)
    mask[..., 4] = 0  # drop the weight-30 pixel: weights sum to 18
    assert b_mse(pred, target, mask=mask).item() == pytest.approx((2 * 18 * 0.01 + 18 * 0.04) / 2)


def test_metric_bad_inputs() -> None:
    target = _target()
    with pytest.raises(memel.ConfigError, match=r"reduction: 'avg'.*allowed: sum, frame_mean, per_frame, none"):
        b_mse(target, target, reduction="avg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"pred and target"):
        b_mse(target[:, :1], target)


def test_convgru_cells_are_hooked_every_step() -> None:
    torch.manual_seed(0)
    model = build("convgru", out_frames=3)
    seen: list[tuple[int, ...]] = []
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
        for name in memel.models.preset_targets(model, "hidden")
    ]
    out = model(torch.rand(2, 4, 1, 32, 32))
    assert out.shape == (2, 3, 1, 32, 32)
    assert len(seen) == 3 * 4 + 3 * 3  # 3 encoder cells x 4 inputs + 3 forecaster cells x 3 outputs
    assert (2, 16, 16, 16) in seen and (2, 32, 4, 4) in seen
    for handle in handles:
        handle.remove()


def test_convgru_hook_replaces_the_state() -> None:
    torch.manual_seed(0)
    model = build("convgru", out_frames=2).eval()
    frames = torch.rand(1, 3, 1, 16, 16)
    with torch.no_grad():
        base = model(frames)
        handle = model.forecaster.cells[2].register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        zeroed = model(frames)
        handle.remove()
    assert not torch.allclose(base, zeroed)


def test_hko7_layout_shapes() -> None:
    model = build("convgru-hko7", device="meta")
    out = model(torch.rand(1, 5, 1, 480, 480, device="meta"), out_frames=2)
    assert out.shape == (1, 2, 1, 480, 480)
