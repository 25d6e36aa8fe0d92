"""The inhibition core against independent computations (NumPy float64, autograd)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from reference import PaperStatistics, top_n
from torch import nn

import memel
from memel.inhibition.statistics import Moments, merge_history
from memel.inhibition.sync import sync_inhibitors


def _batches(seed: int, sizes: list[int], neurons: int, shift: float = 0.0, scale: float = 1.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, neurons, generator=generator) * scale + shift for size in sizes]


def _run(inhibitor: memel.Inhibitor, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    inhibitor.train()
    return [inhibitor(batch) for batch in batches]


# ---------------------------------------------------------------------------------------
# statistics
@pytest.mark.parametrize("layout", ["channel", "element"])
def test_statistics_equal_numpy_over_concatenated_data(layout: str) -> None:
    """Without forgetting, the running mean/var equal NumPy's over all data seen."""
    config = memel.InhibitionConfig(mode="original", layout=layout, forget_steps=1000)
    inhibitor = memel.Inhibitor(config)
    generator = torch.Generator().manual_seed(0)
    # [B, T, H] batches of varying B; large mean relative to spread stresses the merge.
    batches = [torch.randn(b, 3, 5, generator=generator) * 0.5 + 40.0 for b in (4, 1, 7, 2, 9, 3)]
    _run(inhibitor, batches)
    stats = inhibitor.statistics()
    data = torch.cat(batches).double().numpy()
    samples = data.reshape(-1, 5) if layout == "channel" else data.reshape(data.shape[0], -1)
    shape = (5,) if layout == "channel" else (3, 5)
    np.testing.assert_allclose(stats["mean"].numpy(), samples.mean(0).reshape(shape), rtol=1e-6)
    np.testing.assert_allclose(stats["var"].numpy(), samples.var(0, ddof=1).reshape(shape), rtol=1e-4)
    assert (stats["count"].numpy() == samples.shape[0]).all()
    assert stats["batches"] == len(batches)
    assert stats["mean"].dtype == torch.float32 and stats["var"].dtype == torch.float32


def test_forget_step_follows_algorithm_1() -> None:
    """After n_f batches the history weight is capped exactly as in the paper's formulas."""
    config = memel.InhibitionConfig(mode="original", forget_steps=3)
    inhibitor = memel.Inhibitor(config)
    batches = _batches(1, [6, 6, 5, 8, 6, 7, 6, 9], 4, shift=2.0)
    batches[5] = batches[5] * 3 + 1  # a distribution shift the forgetting must follow
    reference = PaperStatistics(forget_steps=3)
    for batch in batches:
        inhibitor(batch)
        reference.update(batch.numpy())
        stats = inhibitor.statistics()
        np.testing.assert_allclose(stats["mean"].numpy(), reference.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["var"].numpy(), reference.var, rtol=1e-5, atol=1e-6)
    assert stats["count"].tolist() == [sum(b.shape[0] for b in batches)] * 4


def test_merge_history_matches_lemma_directly() -> None:
    generator = torch.Generator().manual_seed(2)
    history = torch.randn(40, 6, generator=generator, dtype=torch.float64)
    batch = torch.randn(9, 6, generator=generator, dtype=torch.float64) + 1
    mean, var, count = merge_history(
        history.mean(0).float(), history.var(0).float(), torch.full((6,), 40), 3, _moments(batch), forget_steps=10
    )
    both = torch.cat([history, batch])
    torch.testing.assert_close(mean.double(), both.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), both.var(0), rtol=1e-5, atol=1e-6)
    assert count.tolist() == [49] * 6


def _moments(batch: torch.Tensor) -> Moments:
    """A batch's moments computed directly (two-pass, float64) for the merge tests."""
    x = batch.double()
    return Moments(
        torch.full((x.shape[1],), float(x.shape[0]), dtype=torch.float64),
        x.mean(0),
        x.var(0, correction=0) * x.shape[0],
    )


def test_moments_from_shifted_sums_are_exact_for_any_common_shift() -> None:
    """What sync adds up across ranks (sums about the history mean) gives the exact moments,
    also when the data sit far from the shift (mean/std = 50)."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(12, 5, generator=generator, dtype=torch.float64) * 3 + 150
    for shift_value in (0.0, 99.0, 150.0):
        shift = torch.full((5,), shift_value, dtype=torch.float64)
        d = x - shift
        moments = Moments.from_shifted_sums(
            torch.full((5,), 12.0, dtype=torch.float64), d.sum(0), d.square().sum(0), shift
        )
        torch.testing.assert_close(moments.mean, x.mean(0))
        torch.testing.assert_close(moments.m2, x.var(0, correction=0) * 12, rtol=1e-9, atol=1e-9)
    empty = Moments.from_shifted_sums(
        torch.zeros(5, dtype=torch.float64),
        torch.zeros(5, dtype=torch.float64),
        torch.zeros(5, dtype=torch.float64),
        shift,
    )
    assert (empty.count == 0).all() and (empty.m2 == 0).all()


# ---------------------------------------------------------------------------------------
# Monosemantic Scale, selection, late start
@pytest.mark.parametrize("n", [1, 3])
def test_selection_uses_pre_batch_history(n: int) -> None:
    """Each call selects the top-n MS values per sample, judged against earlier batches only."""
    config = memel.InhibitionConfig(mode="original", top_n=n, forget_steps=4, eps=0.05)
    inhibitor = memel.Inhibitor(config)
    reference = PaperStatistics(forget_steps=4, eps=0.05)
    for index, batch in enumerate(_batches(4, [12, 10, 11, 12, 9, 12, 12], 8)):
        if index:
            expected = top_n(reference.ms(batch.numpy()), n)
            phi = inhibitor.monosemantic_scale(batch).numpy()
            np.testing.assert_allclose(phi, reference.ms(batch.numpy()), rtol=1e-4, atol=1e-6)
            before = inhibitor.window.clone()
            inhibitor(batch)
            snap = inhibitor.snapshot(reset=False)
            counts = np.bincount(expected.reshape(-1), minlength=8)
            np.testing.assert_array_equal(snap.selected_count.numpy() - before[0].numpy(), counts)
            inhibitor.snapshot(reset=True)
        else:
            inhibitor(batch)
        reference.update(batch.numpy())


def test_snapshot_ms_summaries_match_numpy() -> None:
    config = memel.InhibitionConfig(mode="original", forget_steps=100, ms_threshold=2.0)
    inhibitor = memel.Inhibitor(config)
    reference = PaperStatistics(forget_steps=100)
    batches = _batches(5, [30, 25, 40, 35], 6)
    phis = []
    for index, batch in enumerate(batches):
        if index:
            phis.append(reference.ms(batch.numpy()))
        inhibitor(batch)
        reference.update(batch.numpy())
    snap = inhibitor.snapshot()
    phi = np.concatenate(phis)
    np.testing.assert_allclose(snap.mean_ms.numpy(), phi.mean(0), rtol=1e-4)
    np.testing.assert_allclose(snap.max_ms.numpy(), phi.max(0), rtol=1e-4)
    np.testing.assert_allclose(snap.frac_above.numpy(), (phi > 2.0).mean(0), atol=1e-6)
    assert snap.selected_count.sum().item() == phi.shape[0]
    assert snap.inhibited_count.sum().item() == 0  # mode original modifies nothing
    np.testing.assert_allclose(snap.var.numpy(), np.concatenate([b.numpy() for b in batches]).var(0, ddof=1), rtol=1e-4)
    empty = inhibitor.snapshot()
    assert empty.selected_count.sum().item() == 0 and empty.max_ms.sum().item() == 0


def test_late_start_and_forward_values() -> None:
    config = memel.InhibitionConfig(mode="rd", forget_steps=5, late_start=3)
    inhibitor = memel.Inhibitor(config)
    reference = PaperStatistics(forget_steps=5)
    for index, batch in enumerate(_batches(6, [8] * 6, 5)):
        out = inhibitor(batch)
        if index < 3:
            assert torch.equal(out, batch), f"batch {index} was modified before late_start"
        else:
            chosen = top_n(reference.ms(batch.numpy()), 1)[:, 0]
            expected = batch.numpy().copy()
            expected[np.arange(8), chosen] = reference.mean[chosen]
            np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-5)
        reference.update(batch.numpy())


# ---------------------------------------------------------------------------------------
# modification and gradients against autograd
@pytest.mark.parametrize(
    ("mode", "strength"), [("rd", 1.0), ("rd", 2.5), ("rd", 0.0), ("naive_a", 1.0), ("naive_b", 1.0), ("original", 1.0)]
)
@pytest.mark.parametrize("layout", ["channel", "element"])
def test_forward_and_gradient_against_autograd(mode: str, strength: float, layout: str) -> None:
    config = memel.InhibitionConfig(mode=mode, strength=strength, top_n=2, layout=layout, forget_steps=3, late_start=1)
    inhibitor = memel.Inhibitor(config)
    warmup = _batches(7, [6, 6], 12)
    _run(inhibitor, [w.reshape(6, 3, 4) for w in warmup])
    z = torch.randn(6, 3, 4, requires_grad=True)
    upstream = torch.randn(6, 3, 4)
    stats_mean = inhibitor.statistics()["mean"].detach()
    phi = inhibitor.monosemantic_scale(z.detach())

    out = inhibitor(z)
    (out * upstream).sum().backward()
    grad = z.grad.clone()

    # independent reference: the paper's formula written with autograd over a selection mask
    rows = phi.reshape(-1, 4) if layout == "channel" else phi.reshape(6, -1)
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask.scatter_(1, rows.topk(2, dim=1).indices, True)
    mask = mask.reshape(z.shape)
    mu = stats_mean.expand_as(z) if layout == "element" else stats_mean.reshape(1, 1, 4).expand_as(z)
    z_ref = z.detach().clone().requires_grad_(True)
    d = {"rd": strength, "naive_a": 0.0, "naive_b": -1.0}.get(mode)
    if d is None:
        modified = z_ref
    elif mode == "naive_a":
        modified = torch.where(mask, mu, z_ref)
    elif mode == "naive_b":
        modified = torch.where(mask, z_ref + (mu - z_ref).detach(), z_ref)
    else:
        modified = torch.where(mask, -d * z_ref + (mu + d * z_ref).detach(), z_ref)
    (modified * upstream).sum().backward()
    torch.testing.assert_close(out.detach(), modified.detach())
    torch.testing.assert_close(grad, z_ref.grad)
    if mode != "original":
        assert mask.any() and not torch.equal(out.detach(), z.detach())


def test_eval_mode_is_exact_identity() -> None:
    inhibitor = memel.Inhibitor(late_start=0, forget_steps=2)
    _run(inhibitor, _batches(8, [5, 5, 5], 4))
    state = copy.deepcopy(inhibitor.state_dict())
    inhibitor.eval()
    x = torch.randn(5, 4) * 100
    assert inhibitor(x) is x
    for key, value in inhibitor.state_dict().items():
        assert torch.equal(value, state[key]), key


# ---------------------------------------------------------------------------------------
# plug-in insertion and state
class _Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"fc": nn.Linear(6, 16), "act": nn.GELU(), "out": nn.Linear(16, 6)}) for _ in range(3)
        )
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer["out"](layer["act"](layer["fc"](x)))
        return self.head(x)


def test_inhibit_and_remove_keep_host_state_dict() -> None:
    torch.manual_seed(0)
    host = _Host()
    keys = set(host.state_dict())
    params = [p.clone() for p in host.parameters()]
    inserted = memel.inhibit(host, "layers.*.act", memel.InhibitionConfig())
    assert sorted(inserted) == ["layers.0.act", "layers.1.act", "layers.2.act"]
    assert not list(memel.Inhibitor().parameters())
    new_keys = set(host.state_dict()) - keys
    assert keys <= set(host.state_dict())
    assert all(key.startswith("layers.") and ".act.inhibitor." in key for key in new_keys)
    x = torch.randn(4, 5, 6)
    host(x).sum().backward()
    assert inserted["layers.1.act"].statistics()["batches"] == 1
    assert memel.remove(host) == ["layers.0.act", "layers.1.act", "layers.2.act"]
    assert set(host.state_dict()) == keys
    assert all(torch.equal(a, b) for a, b in zip(params, host.parameters()))
    host.eval()
    plain = copy.deepcopy(host)
    torch.testing.assert_close(host(x), plain(x))


def test_restored_model_continues_bit_identically() -> None:
    torch.manual_seed(1)
    config = memel.InhibitionConfig(forget_steps=3, late_start=2, top_n=2)
    original = _Host()
    memel.inhibit(original, ["layers.0.act", "layers.2.act"], config)
    data = [torch.randn(4, 7, 6) for _ in range(8)]
    for x in data[:4]:
        original(x).sum().backward()
    saved = copy.deepcopy(original.state_dict())

    restored = _Host()
    memel.inhibit(restored, ["layers.0.act", "layers.2.act"], config)
    restored.load_state_dict(saved)  # the fresh Inhibitors take their shapes from the checkpoint
    for x in data[4:]:
        a = original(x)
        b = restored(x)
        assert torch.equal(a, b)
        a.sum().backward()
        b.sum().backward()
    for key, value in original.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key


def test_half_precision_model_keeps_fp32_statistics() -> None:
    host = _Host()
    inserted = memel.inhibit(host, "layers.0.act", memel.InhibitionConfig(late_start=1, forget_steps=2))
    host.to(torch.bfloat16)
    inhibitor = inserted["layers.0.act"]
    for _ in range(3):
        out = host(torch.randn(3, 5, 6, dtype=torch.bfloat16))
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    stats = inhibitor.statistics()
    assert stats["mean"].dtype == torch.float32 and stats["var"].dtype == torch.float32
    assert torch.isfinite(stats["var"]).all() and stats["batches"] == 3


# ---------------------------------------------------------------------------------------
# edge cases and bad input
def test_constant_neurons_single_sample_and_huge_values_stay_finite() -> None:
    inhibitor = memel.Inhibitor(late_start=1, forget_steps=2, layout="element")
    for _ in range(3):
        out = inhibitor(torch.ones(1, 4))  # B=1 of constant neurons: var 0 everywhere
    assert torch.isfinite(out).all()
    stats = inhibitor.statistics()
    assert torch.isfinite(stats["var"]).all() and (stats["var"] == 0).all()
    phi = inhibitor.monosemantic_scale(torch.tensor([[1.0, 2.0, -3e38, 3e38]]))
    assert torch.isfinite(phi).all()
    snap = inhibitor.snapshot()
    assert all(torch.isfinite(t).all() for t in (snap.max_ms, snap.mean_ms, snap.frac_above))


def test_non_finite_values_do_not_poison_statistics() -> None:
    inhibitor = memel.Inhibitor(mode="rd", late_start=1, forget_steps=10)
    clean = _batches(9, [6, 6], 4)
    inhibitor(clean[0])
    bad = clean[1].clone()
    bad[2, 1] = float("nan")
    bad[3, 3] = float("inf")
    out = inhibitor(bad)
    stats = inhibitor.statistics()
    first = clean[0].double()
    assert torch.isfinite(stats["mean"]).all() and torch.isfinite(stats["var"]).all()
    # neurons 1 and 3 skipped the bad batch; neurons 0 and 2 merged it
    torch.testing.assert_close(stats["mean"][[1, 3]].double(), first.mean(0)[[1, 3]], rtol=1e-6, atol=1e-6)
    both = torch.cat([first, clean[1].double()])
    torch.testing.assert_close(stats["mean"][[0, 2]].double(), both.mean(0)[[0, 2]], rtol=1e-6, atol=1e-6)
    assert stats["count"].tolist() == [12, 6, 12, 6]
    # the non-finite values rank highest and are replaced by their neuron's mean (the history
    # before the batch, i.e. the first batch's), not just by some finite number
    torch.testing.assert_close(out[2, 1].double(), first.mean(0)[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[3, 3].double(), first.mean(0)[3], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("top_n", {"top_n": 0}),
        ("forget_steps", {"forget_steps": 0}),
        ("mode", {"mode": "reverse"}),
        ("layout", {"layout": "rows"}),
        ("eps", {"eps": -0.1}),
        ("strength", {"strength": float("nan")}),
        ("late_start", {"late_start": -1}),
        ("strength", {"mode": "naive_a", "strength": 5.0}),
        ("unknown field", {"stregth": 2.0}),
    ],
)
def test_invalid_config_names_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(memel.ConfigError, match=field):
        memel.InhibitionConfig(**kwargs)


def test_defaults_and_late_start_follows_forget_steps() -> None:
    config = memel.InhibitionConfig()
    assert (config.mode, config.strength, config.top_n, config.layout) == ("rd", 1.0, 1, "channel")
    assert (config.forget_steps, config.late_start, config.eps, config.ms_threshold) == (10, 10, 0.01, 9.0)
    assert memel.InhibitionConfig(forget_steps=4).late_start == 4


def test_top_n_larger_than_neurons_and_unmatched_target_fail_clearly() -> None:
    with pytest.raises(memel.ConfigError, match="top_n.*larger than the 4 neurons"):
        memel.Inhibitor(top_n=5)(torch.randn(3, 4))
    host = _Host()
    with pytest.raises(memel.ConfigError, match=r"targets.*\['layers\.\*\.relu'\]"):
        memel.inhibit(host, ["layers.*.act", "layers.*.relu"])
    assert not memel.inhibitors(host), "a failed insertion must not leave modules behind"


def test_step_mode_merges_micro_batches_as_one_batch() -> None:
    """Gradient-accumulation micro-batches are one batch: same as one call on their union."""
    step = memel.Inhibitor(mode="rd", stats_update="step", forget_steps=2, late_start=1)
    whole = memel.Inhibitor(mode="rd", stats_update="call", forget_steps=2, late_start=1)
    batches = _batches(10, [8] * 8, 6)
    for i in range(0, 8, 2):
        a = step(batches[i])
        b = step(batches[i + 1])
        sync_inhibitors([step])
        c = whole(torch.cat(batches[i : i + 2]))
        torch.testing.assert_close(torch.cat([a, b]), c)
    for key in ("mean", "var", "count"):
        torch.testing.assert_close(step.statistics()[key], whole.statistics()[key])
    assert step.statistics()["batches"] == whole.statistics()["batches"] == 4


def test_compiled_kernel_matches_eager() -> None:
    """The fused torch.compile path selects, modifies and tracks exactly like the eager one."""
    results = {}
    for kernel in ("eager", "compiled"):
        inhibitor = memel.Inhibitor(mode="rd", strength=2.0, top_n=3, forget_steps=2, late_start=1, kernel=kernel)
        outputs, grads = [], []
        for batch in _batches(12, [16, 16, 16, 16], 32):
            z = batch.reshape(4, 4, 32).requires_grad_(True)
            out = inhibitor(z)
            out.square().sum().backward()
            outputs.append(out.detach())
            grads.append(z.grad)
        results[kernel] = (outputs, grads, inhibitor.statistics(), inhibitor.snapshot())
    (eo, eg, es, esnap), (co, cg, cs, csnap) = results["eager"], results["compiled"]
    for a, b in zip(eo + eg, co + cg):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for key in ("mean", "var"):
        torch.testing.assert_close(es[key], cs[key], rtol=1e-5, atol=1e-6)
    assert torch.equal(esnap.selected_count, csnap.selected_count)
    torch.testing.assert_close(esnap.max_ms, csnap.max_ms, rtol=1e-4, atol=1e-5)


def test_near_zero_variance_history_still_updates_statistics() -> None:
    """A history of constant neurons makes phi overflow float32; statistics must stay exact."""
    inhibitor = memel.Inhibitor(mode="rd", forget_steps=100, late_start=1)
    first = torch.full((6, 3), 2.0)
    second = torch.tensor([[2.0, 40.0, -30.0]] * 3 + [[2.0, -40.0, 30.0]] * 3)
    inhibitor(first)
    out = inhibitor(second)
    assert torch.isfinite(out).all()
    stats = inhibitor.statistics()
    both = torch.cat([first, second]).double()
    torch.testing.assert_close(stats["var"].double(), both.var(0), rtol=1e-5, atol=1e-6)
    assert stats["count"].tolist() == [12, 12, 12]


def test_moving_the_module_keeps_statistics_and_behaviour() -> None:
    """.to(dtype/device) keeps float32 statistics and drops caches tied to the old placement."""
    moved, kept = memel.Inhibitor(late_start=1, forget_steps=2), memel.Inhibitor(late_start=1, forget_steps=2)
    batches = _batches(13, [5, 5, 5, 5], 4)
    for batch in batches[:3]:
        moved(batch)
        kept(batch)
    moved.to(torch.float64)
    assert moved._scale is None and moved.mean.dtype == torch.float32
    assert torch.equal(moved(batches[3]), kept(batches[3]))
