"""The local fused path (``Inhibitor._fold``: measure and merge in one native pass, with the
uniform increments kept lazily) against the two-step path it replaces (measure, record the
call's moments as pending, merge them at the next sync), which the reference tests check
against numpy. Outside a distributed run ``stats_update="call"`` takes the fused path;
``stats_update="step"`` with ``memel.sync`` after every call is the same algorithm done in
two steps, so both must give the same bits.
"""

from __future__ import annotations

import pytest
import torch

import memel
import memel.inhibition.module as inhibitor_module
from memel.inhibition.sync import sync_inhibitors

pytestmark = pytest.mark.usefixtures("native_kernel")


@pytest.fixture
def fold_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls that really took the fused path."""
    calls: list[int] = []
    real = inhibitor_module.native_fold

    def counting(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(inhibitor_module, "native_fold", counting)
    return calls


def _batches(shape: tuple[int, ...], dtype: torch.dtype, count: int, seed: int) -> list[torch.Tensor]:
    """Drifting batches; two of them carry NaN/inf in a few neurons (which then skip the call)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(count):
        batch = torch.randn(*shape, generator=generator) * (1 + 0.3 * i) + 0.2 * i
        if i in (2, 5):
            flat = batch.view(-1)
            flat[torch.randint(flat.numel(), (3,), generator=generator)] = torch.tensor(
                [float("nan"), float("inf"), -float("inf")]
            )
        batches.append(batch.to(dtype))
    return batches


def _run(config: dict, batches: list[torch.Tensor], two_step: bool, snapshot_at: int = 4) -> dict:
    inhibitor = memel.Inhibitor(**config, stats_update="step" if two_step else "call")
    outputs, grads, snaps = [], [], []
    generator = torch.Generator().manual_seed(99)
    for i, batch in enumerate(batches):
        z = batch.clone().requires_grad_(True)
        out = inhibitor(z)
        loss = (out.float() * torch.randn(out.shape, generator=generator)).sum()
        extra = inhibitor.auxiliary_loss()
        if extra is not None:
            loss = loss + extra
        loss.backward()
        outputs.append(out.detach())
        grads.append(z.grad)
        if two_step:
            sync_inhibitors([inhibitor])
        if i == snapshot_at:
            snaps.append(inhibitor.snapshot())
    snaps.append(inhibitor.snapshot(reset=False))
    return {
        "outputs": outputs,
        "grads": grads,
        "statistics": inhibitor.statistics(),
        "snapshots": snaps,
        "state": inhibitor.state_dict(),
        "threshold": inhibitor.threshold(),
    }


def _assert_identical(a: dict, b: dict) -> None:
    for x, y in zip(a["outputs"] + a["grads"], b["outputs"] + b["grads"], strict=True):
        assert torch.equal(x.nan_to_num(), y.nan_to_num())
    for key in ("mean", "var", "count"):
        assert torch.equal(a["statistics"][key], b["statistics"][key]), key
    assert a["statistics"]["batches"] == b["statistics"]["batches"]
    for s, t in zip(a["snapshots"], b["snapshots"], strict=True):
        for field in ("mean", "var", "count", "selected_count", "inhibited_count", "max_ms", "mean_ms", "frac_above"):
            assert torch.equal(getattr(s, field), getattr(t, field)), field
    for key in a["state"]:
        if key not in ("pending", "tau_pending"):  # the two-step path has just synced: zero too
            assert torch.equal(a["state"][key], b["state"][key]), key
    assert a["threshold"] == b["threshold"]


@pytest.mark.parametrize(
    "layout,shape",
    [
        ("element", (6, 8, 300)),  # few samples: each task a range of neurons, folded tile by tile
        ("channel", (4, 80, 48)),  # many samples: each task a block of rows, folded after the merge
    ],
)
@pytest.mark.parametrize(
    "options",
    [
        {"mode": "rd", "top_n": 3, "strength": 2.0},
        {"mode": "rd", "select": "threshold", "fraction": 0.05},
        {"mode": "l2e", "top_n": 2},
        {"mode": "original"},
    ],
    ids=["rd-top3", "rd-threshold", "l2e", "original"],
)
def test_fused_path_gives_the_same_bits_as_the_two_step_path(
    layout: str, shape: tuple[int, ...], options: dict, fold_calls: list[int]
) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # the row-parallel split needs several tasks, whatever the machine
    try:
        batches = _batches(shape, torch.float32, 9, seed=len(options))
        config = {"layout": layout, "forget_steps": 3, "late_start": 2, "track_every": 2, "kernel": "native", **options}
        fused = _run(config, batches, two_step=False)
        assert sum(fold_calls) == len(batches) - 1  # every call but the first (no history yet)
        two_step = _run(config, batches, two_step=True)
        _assert_identical(fused, two_step)
    finally:
        torch.set_num_threads(threads)
    inhibited = sum(int(s.inhibited_count.sum()) for s in fused["snapshots"][:1]) + int(
        fused["snapshots"][-1].inhibited_count.sum()
    )
    assert (inhibited > 0) == (options["mode"] != "original")
    if options["mode"] == "rd":
        assert not all(torch.equal(o.nan_to_num(), b.nan_to_num()) for o, b in zip(fused["outputs"], batches))
    counts = fused["statistics"]["count"].reshape(-1)
    assert counts.min() < counts.max()  # some neurons skipped the non-finite calls


def test_fused_path_in_bfloat16_and_restored_mid_run(fold_calls: list[int]) -> None:
    """A state_dict taken mid-run (lazy increments flushed into it) restores a module that
    continues with the same bits as the original."""
    batches = _batches((5, 7, 64), torch.bfloat16, 10, seed=4)
    config = {"layout": "element", "forget_steps": 2, "late_start": 1, "top_n": 2, "kernel": "native"}
    original = memel.Inhibitor(**config)
    for batch in batches[:6]:
        original(batch.clone().requires_grad_(True)).float().sum().backward()
    restored = memel.Inhibitor(**config)
    restored.load_state_dict(original.state_dict())
    reference = memel.Inhibitor(**config, stats_update="step")
    for batch in batches[:6]:
        reference(batch.clone().requires_grad_(True)).float().sum().backward()
        sync_inhibitors([reference])
    assert torch.equal(restored.count, reference.count) and torch.equal(restored.window, reference.window)
    for batch in batches[6:]:
        outs = [m(batch.clone().requires_grad_(True)) for m in (original, restored, reference)]
        sync_inhibitors([reference])
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    for key in ("mean", "var", "count"):
        assert torch.equal(original.statistics()[key], restored.statistics()[key])
        assert torch.equal(original.statistics()[key], reference.statistics()[key])
    assert all(fold_calls)


def test_fused_path_is_not_taken_where_it_does_not_apply(fold_calls: list[int]) -> None:
    """Eager kernel, stats_update="step": the two-step path (the distributed case is covered
    by the gloo tests, whose ranks must all-reduce before merging)."""
    batch = torch.randn(4, 16, 8)
    for config in ({"kernel": "eager"}, {"stats_update": "step"}):
        inhibitor = memel.Inhibitor(**config)
        for _ in range(3):
            inhibitor(batch.clone())
    assert not fold_calls
