"""Threshold selection and inhibition as a loss (arXiv 2503.23298, "L2E") against independent
computations: NumPy/torch float64 Monosemantic Scale, hand-worked losses, autograd."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import counting_all_reduce, run_distributed
from reference import PaperStatistics
from torch import nn

import memel
from memel.inhibition import kernels, native
from memel.inhibition.config import initial_threshold


def _stationary(kind: str, seed: int, calls: int, samples: int, neurons: int) -> list[torch.Tensor]:
    """Stationary activations with a per-neuron location and scale."""
    generator = torch.Generator().manual_seed(seed)
    loc = torch.randn(neurons, generator=generator) * 2
    spread = torch.rand(neurons, generator=generator) + 0.5
    batches = []
    for _ in range(calls):
        if kind == "gaussian":
            x = torch.randn(samples, neurons, generator=generator)
        elif kind == "laplace":  # heavier tails than Gaussian: the initial tau is too low
            u = torch.rand(samples, neurons, generator=generator) - 0.5
            x = -u.sign() * torch.log1p(-2 * u.abs())
        else:  # uniform: bounded, lighter tails: the initial tau is too high
            x = torch.rand(samples, neurons, generator=generator) * 2 - 1
        batches.append(x * spread + loc)
    return batches


def _judge(inhibitor: memel.Inhibitor, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
    """phi of every value (float64, independent of the kernels) and the tau the next call uses."""
    return inhibitor.monosemantic_scale(batch), inhibitor.threshold()


# ---------------------------------------------------------------------------------------
# the moving threshold
@pytest.mark.parametrize("kind", ["gaussian", "laplace", "uniform"])
@pytest.mark.parametrize("fraction", [0.02, 0.05])
def test_threshold_converges_to_the_requested_fraction(kind: str, fraction: float) -> None:
    """On stationary data the share of values with phi >= tau over the last calls is within
    0.5 percentage points of ``fraction``, and tau sits at the (1 - fraction) quantile of phi."""
    inhibitor = memel.Inhibitor(mode="original", select="threshold", fraction=fraction, forget_steps=20)
    batches = _stationary(kind, 1, 220, 128, 64)
    selected, judged, phis, taus = 0, 0, [], []
    for index, batch in enumerate(batches):
        if index >= 120:
            phi, tau = _judge(inhibitor, batch)
            before = inhibitor.window[0].sum().item()
            inhibitor(batch)
            chosen = inhibitor.window[0].sum().item() - before
            assert chosen == (phi >= tau).sum().item() or _near(phi, tau)
            selected += chosen
            judged += batch.numel()
            phis.append(phi.flatten())
            taus.append(tau)
        else:
            inhibitor(batch)
    share = selected / judged
    assert abs(share - fraction) <= 0.005, (kind, fraction, share)
    quantile = torch.quantile(torch.cat(phis[-40:]), 1 - fraction).item()
    assert abs(math.log(taus[-1] / quantile)) < 0.1, (taus[-1], quantile)
    if kind != "gaussian":  # the start (the Gaussian quantile) was wrong: tau really moved
        assert abs(math.log(taus[-1] / initial_threshold(fraction))) > 0.1


def _near(phi: torch.Tensor, tau: float) -> bool:
    """Some value lies within float32 rounding of tau (where the kernel may judge either way)."""
    return bool(((phi - tau).abs() <= 1e-5 * tau).any())


def test_initial_threshold_is_the_gaussian_quantile() -> None:
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for p in (0.02, 0.05):
        empirical = torch.quantile(x.square()[:1_000_000], 1 - p).item()
        assert initial_threshold(p) == pytest.approx(empirical, rel=0.01)


def test_threshold_update_rule_by_hand() -> None:
    """log tau += clip(rate * (observed - p)/p, -1, 1), once per merged batch, from the counts."""
    inhibitor = memel.Inhibitor(mode="original", select="threshold", fraction=0.1, threshold_rate=0.2, forget_steps=50)
    batches = _stationary("gaussian", 2, 6, 40, 5)
    inhibitor(batches[0])
    tau = initial_threshold(0.1)
    assert inhibitor.tau.item() == tau and inhibitor.tau.dtype == torch.float64
    for batch in batches[1:]:
        phi = inhibitor.monosemantic_scale(batch)
        inhibitor(batch)
        observed = (phi >= tau).double().mean().item()
        tau *= math.exp(max(-1.0, min(1.0, 0.2 * (observed - 0.1) / 0.1)))
        assert inhibitor.threshold() == pytest.approx(tau, rel=1e-12)
    # a batch far out (everything above tau) moves log tau by at most 1
    before = inhibitor.threshold()
    inhibitor(batches[0] * 100)
    assert inhibitor.threshold() == pytest.approx(before * math.e, rel=1e-12)


# ---------------------------------------------------------------------------------------
# selection and modification by threshold
@pytest.mark.parametrize(("mode", "strength"), [("rd", 2.0), ("naive_a", 1.0), ("naive_b", 1.0), ("original", 1.0)])
@pytest.mark.parametrize("kernel", ["eager", "native"])
@pytest.mark.parametrize("layout", ["channel", "element"])
def test_threshold_inhibits_exactly_the_values_above_tau(mode: str, strength: float, kernel: str, layout: str) -> None:
    config = memel.InhibitionConfig(
        mode=mode,
        strength=strength,
        select="threshold",
        fraction=0.05,
        forget_steps=4,
        late_start=3,
        layout=layout,
        kernel=kernel,
    )
    inhibitor = memel.Inhibitor(config)
    reference = PaperStatistics(forget_steps=4)
    d = {"rd": strength, "naive_a": 0.0, "naive_b": -1.0}.get(mode)
    for index, batch in enumerate(_stationary("laplace", 3, 7, 48, 24)):
        z = batch.reshape(48, 4, 6).requires_grad_(True)
        upstream = torch.randn(z.shape)
        if index == 0:
            out = inhibitor(z)
            assert torch.equal(out, z)
            reference.update(_rows(batch, layout))
            continue
        phi, tau = _judge(inhibitor, z.detach())
        np.testing.assert_allclose(_rows(phi, layout), reference.ms(_rows(batch, layout)), rtol=1e-5, atol=1e-8)
        mask = phi >= tau
        assert not _near(phi, tau)
        before = inhibitor.window.clone()
        out = inhibitor(z)
        (out * upstream).sum().backward()
        counts = _rows(mask, layout).sum(0)
        assert np.array_equal((inhibitor.window[0] - before[0]).numpy(), counts)
        inhibiting = index >= 3 and d is not None
        assert np.array_equal(
            (inhibitor.window[1] - before[1]).numpy(), counts if index >= 3 and mode != "original" else 0 * counts
        )
        mu = torch.as_tensor(reference.mean, dtype=torch.float32)
        mu = mu.reshape(4, 6) if layout == "element" else mu.reshape(6)
        if inhibiting:
            expected = torch.where(mask, mu.expand_as(z), z.detach())
            grad = torch.where(mask, -d * upstream, upstream)
        else:
            expected, grad = z.detach(), upstream
        torch.testing.assert_close(out.detach(), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(out.detach()[~mask], z.detach()[~mask])
        torch.testing.assert_close(z.grad, grad)
        if index >= 3:
            assert mask.any()
        reference.update(_rows(batch, layout))


def _rows(t: torch.Tensor, layout: str) -> np.ndarray:
    """[samples, neurons] view of a [48, 4, 6] (or [48, 24]) tensor under ``layout``."""
    array = t.detach().numpy() if isinstance(t, torch.Tensor) else t
    return array.reshape(-1, 6) if layout == "channel" else array.reshape(48, -1)


def test_native_threshold_selection_equals_eager() -> None:
    """The fused C++ pass selects the same values, in the same (row-major) order, as the eager
    comparison, for every work split, dtype and non-finite value (NaN counts as above)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if native.load() is None:
            pytest.skip(f"the native inhibition kernel cannot be built here: {native._failed}")
    generator = torch.Generator().manual_seed(4)
    for samples, neurons in [(1, 1), (5, 7), (300, 40), (70, 2500), (3, 3000), (700, 1100)]:
        for dtype in (torch.float32, torch.bfloat16):
            values = (torch.randn(samples, neurons, generator=generator) * 2).to(dtype)
            values[0, 0] = float("nan")
            values[-1, -1] = float("inf")
            values[samples // 2, neurons // 2] = float("-inf")
            mean = torch.randn(neurons, generator=generator) * 0.3
            scale = torch.rand(neurons, generator=generator) + 0.25
            cut = torch.tensor(1.9).float()
            eager = kernels.eager_measure(values, mean, scale, 1, 3.0, True, True, cut)
            for threads in (1, 2, 3):
                fused = native.native_measure(
                    values, mean, scale, 1, 3.0, True, True, threads, select_threshold=float(cut)
                )
                assert fused is not None
                assert torch.equal(fused[4], eager[4]), (samples, neurons, dtype, threads)
                assert torch.equal(fused[3], eager[3])
    flat = eager[4]
    assert flat.dim() == 1 and bool((flat[1:] > flat[:-1]).all())


# ---------------------------------------------------------------------------------------
# state
class _Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def _host(config: memel.InhibitionConfig, seed: int = 0) -> _Host:
    torch.manual_seed(seed)
    host = _Host()
    memel.inhibit(host, "blocks.*.1", config)
    return host


@pytest.mark.parametrize("mode", ["rd", "l2e"])
def test_tau_survives_state_dict_and_training_continues_bit_identically(mode: str) -> None:
    config = memel.InhibitionConfig(mode=mode, select="threshold", fraction=0.05, forget_steps=3, late_start=2)
    original = _host(config)
    data = [torch.randn(6, 8, 16, generator=torch.Generator().manual_seed(i)) * (1 + i % 3) for i in range(12)]

    def step(host: _Host, x: torch.Tensor) -> torch.Tensor:
        host.zero_grad()
        out = host(x)
        (out.square().mean() + memel.auxiliary_loss(host)).backward()
        return out

    for x in data[:6]:
        step(original, x)
    saved = copy.deepcopy(original.state_dict())
    taus = [m.tau.item() for m in memel.inhibitors(original).values()]
    assert all(tau != initial_threshold(0.05) for tau in taus)
    assert all(saved[f"blocks.{i}.1.inhibitor.tau"].dtype == torch.float64 for i in range(2))

    restored = _host(config, seed=0)
    restored.load_state_dict(saved)
    assert [m.tau.item() for m in memel.inhibitors(restored).values()] == taus
    for x in data[6:]:
        a, b = step(original, x), step(restored, x)
        assert torch.equal(a, b)
        for p, q in zip(original.parameters(), restored.parameters()):
            assert torch.equal(p.grad, q.grad)
    for key, value in original.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key


def test_checkpoint_without_tau_loads_with_the_initial_tau() -> None:
    """A checkpoint written before threshold selection existed still loads (tau starts afresh)."""
    config = memel.InhibitionConfig(select="threshold", forget_steps=2, late_start=1)
    host = _host(config)
    for i in range(3):
        host(torch.randn(4, 16))
    saved = {k: v for k, v in host.state_dict().items() if not k.endswith(("tau", "tau_pending"))}
    fresh = _host(config)
    fresh.load_state_dict(saved)
    for module in memel.inhibitors(fresh).values():
        assert module.tau.item() == initial_threshold(0.02) and module.statistics()["batches"] == 3


# ---------------------------------------------------------------------------------------
# the L2E loss
def _hand_example(**overrides: object) -> tuple[memel.Inhibitor, torch.Tensor]:
    """History: mean (1, 12, 0), var (2, 8, 2) (eps 0); the next batch is ``z``."""
    config = {"mode": "l2e", "forget_steps": 100, "late_start": 1, "eps": 0.0, "l2e_weight": 0.5, "delta": 0.25}
    inhibitor = memel.Inhibitor(**{**config, **overrides})
    inhibitor(torch.tensor([[0.0, 10.0, -1.0], [2.0, 14.0, 1.0]]))
    stats = inhibitor.statistics()
    assert stats["mean"].tolist() == [1.0, 12.0, 0.0] and stats["var"].tolist() == [2.0, 8.0, 2.0]
    z = torch.tensor([[1.5, 12.0, 3.0], [1.0, 20.0, 0.5]], requires_grad=True)
    return inhibitor, z


def test_l2e_loss_and_gradient_by_hand() -> None:
    """phi rows: (0.125, 0, 4.5) and (0, 8, 0.125): top-1 selects z=3 (mu 0) and z=20 (mu 12).
    L = 0.5 * mean(log(3^2 + 0.25), log(8^2 + 0.25)); dL/dz = 0.5 * 2(z-mu)/((z-mu)^2+0.25) / 2."""
    inhibitor, z = _hand_example()
    out = inhibitor(z)
    assert torch.equal(out, z) and out.data_ptr() == z.data_ptr()  # same values, same memory: no copy
    loss = memel.auxiliary_loss(inhibitor)
    assert loss.item() == pytest.approx(0.5 * (math.log(9.25) + math.log(64.25)) / 2, rel=1e-6)
    loss.backward()
    expected = torch.zeros(2, 3)
    expected[0, 2] = 0.5 * 2 * 3.0 / 9.25 / 2
    expected[1, 1] = 0.5 * 2 * 8.0 / 64.25 / 2
    torch.testing.assert_close(z.grad, expected)


def test_l2e_with_threshold_selection_by_hand() -> None:
    """Threshold selection composes with the loss: here every value with phi >= tau = 1."""
    inhibitor, z = _hand_example(select="threshold", fraction=0.3)
    state = inhibitor.state_dict()
    state["tau"] = torch.tensor(1.0, dtype=torch.float64)  # as if tau had converged there
    inhibitor.load_state_dict(state)
    inhibitor(z)
    loss = memel.auxiliary_loss(inhibitor)
    assert loss.item() == pytest.approx(0.5 * (math.log(9.25) + math.log(64.25)) / 2, rel=1e-6)


def test_l2e_against_autograd_and_one_sgd_step_moves_selected_values_to_the_mean() -> None:
    inhibitor = memel.Inhibitor(mode="l2e", top_n=3, forget_steps=5, late_start=2, l2e_weight=2.0, delta=1e-3)
    batches = _stationary("laplace", 5, 3, 32, 10)
    for batch in batches[:2]:
        inhibitor(batch)
    assert memel.auxiliary_loss(inhibitor).item() == 0.0  # before the late start: nothing
    x = batches[2].clone().requires_grad_(True)
    phi = inhibitor.monosemantic_scale(x.detach())
    mu = inhibitor.statistics()["mean"]
    mask = torch.zeros_like(phi, dtype=torch.bool).scatter_(1, phi.topk(3, 1).indices, True)
    out = inhibitor(x)
    assert torch.equal(out, batches[2])
    loss = memel.auxiliary_loss(inhibitor)
    loss.backward()
    x_ref = batches[2].clone().requires_grad_(True)
    expected = 2.0 * torch.log((x_ref - mu)[mask].square() + 1e-3).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert bool((x.grad[~mask] == 0).all()) and bool((x.grad[mask] != 0).all())
    stepped = x.detach() - 0.5 * x.grad
    closer = (stepped - mu).abs() < (x.detach() - mu).abs()
    assert bool(closer[mask].all())  # the loss pushes selected values TOWARDS the mean
    assert torch.equal(stepped[~mask], x.detach()[~mask])


@pytest.mark.parametrize(
    "use_output,use_loss", [(True, True), (False, True), (True, False)], ids=["both", "loss_only", "output_only"]
)
@pytest.mark.parametrize("layout,shape", [("channel", (3, 7, 16)), ("element", (5, 4, 6))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["native", "eager"])
def test_l2e_gradient_reaches_the_producer_like_autograd(
    use_output: bool, use_loss: bool, layout: str, shape: tuple[int, ...], dtype: torch.dtype, kernel: str
) -> None:
    """The loss terms' gradient (sparse, added by autograd into the output's dense one) reaches
    the layer before the Inhibitor exactly as plain autograd of the same expression does:
    with or without a downstream gradient, with or without the loss, in both layouts."""
    inhibitor = memel.Inhibitor(
        mode="l2e", top_n=2, forget_steps=3, late_start=2, l2e_weight=0.7, layout=layout, kernel=kernel
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        inhibitor(torch.randn(*shape, generator=generator).to(dtype))
    memel.auxiliary_loss(inhibitor)
    x = torch.randn(*shape, generator=generator).to(dtype).requires_grad_(True)
    upstream = torch.randn(*shape, generator=generator).to(dtype)
    phi = inhibitor.monosemantic_scale(torch.nn.functional.gelu(x.detach()).float())
    mu = inhibitor.statistics()["mean"].reshape(-1)
    samples = phi.reshape(-1, mu.numel())
    mask = torch.zeros_like(samples, dtype=torch.bool).scatter_(1, samples.topk(2, 1).indices, True).reshape(shape)

    h = torch.nn.functional.gelu(x)
    out = inhibitor(h)
    assert torch.equal(out, h) and out.data_ptr() == h.data_ptr()
    loss = memel.auxiliary_loss(inhibitor)
    total = (out * upstream).sum() if use_output else 0.0
    (total + (loss if use_loss else 0.0)).backward()

    x_ref = x.detach().clone().requires_grad_(True)
    h_ref = torch.nn.functional.gelu(x_ref)
    centred = (h_ref.float().reshape(-1, mu.numel()) - mu).reshape(shape)
    expected = 0.7 * torch.log(centred[mask].square() + 1e-6).mean()
    torch.testing.assert_close(loss, expected)
    total_ref = (h_ref * upstream).sum() if use_output else 0.0
    (total_ref + (expected if use_loss else 0.0)).backward()
    assert x.grad.layout == torch.strided and x.grad.dtype == dtype
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_l2e_output_keeps_the_activation_in_place_rules() -> None:
    """The output shares the activation's memory and version counter: what an in-place change
    of the activation itself would do (allowed after GELU, refused after ReLU, which saves its
    output) the output does too, and an allowed one trains like plain autograd."""
    inhibitor = memel.Inhibitor(mode="l2e", forget_steps=2, late_start=1)
    inhibitor(torch.randn(4, 8))
    x = torch.randn(4, 8, requires_grad=True)
    out = inhibitor(torch.nn.functional.gelu(x))
    out.mul_(2.0)  # GELU saves its input, not its output
    (out.sum() + memel.auxiliary_loss(inhibitor)).backward()
    assert torch.isfinite(x.grad).all()
    out = inhibitor(torch.relu(x))
    out.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.sum() + memel.auxiliary_loss(inhibitor)).backward()


def _mlp_with_l2e(kernel: str = "native", dtype: torch.dtype = torch.float32):
    """x -> GELU -> Inhibitor(l2e) -> linear on the 3-D activation (its gradient arrives as a
    view of a matrix product, as in every transformer MLP), past the late start."""
    inhibitor = memel.Inhibitor(mode="l2e", top_n=2, forget_steps=3, late_start=1, l2e_weight=0.7, kernel=kernel)
    generator = torch.Generator().manual_seed(3)
    inhibitor(torch.randn(4, 6, 32, generator=generator).to(dtype))
    memel.auxiliary_loss(inhibitor)
    x = torch.randn(4, 6, 32, generator=generator).to(dtype).requires_grad_(True)
    weight = torch.randn(5, 32, generator=generator).to(dtype)
    return inhibitor, x, weight


def _reference_gradient(inhibitor: memel.Inhibitor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """d/dx of (linear(gelu(x)) ** 2).sum() + the l2e loss of the next call, by plain autograd
    (float64 MS against the history before that call: take it before the call)."""
    phi = inhibitor.monosemantic_scale(torch.nn.functional.gelu(x.detach()).float()).reshape(-1, 32)
    mu = inhibitor.statistics()["mean"]
    mask = torch.zeros_like(phi, dtype=torch.bool).scatter_(1, phi.topk(2, 1).indices, True).reshape(x.shape)
    x_ref = x.detach().clone().requires_grad_(True)
    h = torch.nn.functional.gelu(x_ref)
    loss = 0.7 * torch.log((h.float() - mu)[mask].square() + 1e-6).mean()
    (torch.nn.functional.linear(h, weight).square().sum() + loss).backward()
    return x_ref.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2e_gradient_is_added_in_place_into_a_gradient_only_autograd_holds(dtype: torch.dtype) -> None:
    """The output's gradient (a view here, which autograd itself never accumulates into) gets
    the loss terms' gradient added in place: the activation's gradient is the same memory,
    no activation-sized tensor is written, and it equals plain autograd's."""
    inhibitor, x, weight = _mlp_with_l2e(dtype=dtype)
    expected = _reference_gradient(inhibitor, x, weight)
    seen: dict[str, int] = {}
    h = torch.nn.functional.gelu(x)
    h.register_hook(lambda grad: seen.__setitem__("activation", grad.data_ptr()))
    out = inhibitor(h)
    out.register_hook(lambda grad: seen.__setitem__("output", grad.data_ptr()))  # (reads, keeps nothing)
    (torch.nn.functional.linear(out, weight).square().sum() + memel.auxiliary_loss(inhibitor)).backward()
    assert seen["activation"] == seen["output"]
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("mode", ["l2e", "rd"])
def test_float64_activations_train_with_the_default_kernel(mode: str) -> None:
    """float64, which the native kernel does not read, trains under the default kernel
    (``auto``: in-place changes asked for, then refused for the dtype) exactly as under the
    eager kernel."""
    generator = torch.Generator().manual_seed(6)
    batches = [torch.randn(4, 6, 32, generator=generator, dtype=torch.float64) for _ in range(3)]
    weight = torch.randn(5, 32, generator=generator, dtype=torch.float64)
    grads = {}
    for kernel in ("auto", "eager"):
        inhibitor = memel.Inhibitor(mode=mode, top_n=2, late_start=1, kernel=kernel)
        for batch in batches:
            x = batch.clone().requires_grad_(True)
            out = inhibitor(torch.nn.functional.gelu(x))
            loss = torch.nn.functional.linear(out, weight).square().sum()
            extra = inhibitor.auxiliary_loss()
            (loss if extra is None else loss + extra).backward()
        grads[kernel] = x.grad
    assert grads["auto"].dtype == torch.float64 and torch.isfinite(grads["auto"]).all()
    assert torch.equal(grads["auto"], grads["eager"])


def test_l2e_gradient_that_a_hook_keeps_is_left_alone() -> None:
    """A hook that keeps the output's gradient makes it shared: it is not written to (the
    sparse path runs), and the activation's gradient is still plain autograd's."""
    inhibitor, x, weight = _mlp_with_l2e()
    expected = _reference_gradient(inhibitor, x, weight)
    kept: list[torch.Tensor] = []
    h = torch.nn.functional.gelu(x)
    out = inhibitor(h)
    out.register_hook(kept.append)
    (torch.nn.functional.linear(out, weight).square().sum() + memel.auxiliary_loss(inhibitor)).backward()
    downstream = 2 * torch.nn.functional.linear(h.detach(), weight) @ weight  # d/d out of the squared sum
    torch.testing.assert_close(kept[0], downstream)  # no loss terms added into it
    torch.testing.assert_close(x.grad, expected)


def test_l2e_leaves_a_callers_output_gradient_alone() -> None:
    """A gradient the caller passes for the output (``grad_tensors``) is the caller's: unchanged."""
    inhibitor, x, _ = _mlp_with_l2e()
    out = inhibitor(torch.nn.functional.gelu(x))
    upstream = torch.randn(out.shape)
    before = upstream.clone()
    torch.autograd.backward([out, memel.auxiliary_loss(inhibitor)], [upstream, torch.tensor(1.0)])
    assert torch.equal(upstream, before)
    assert torch.isfinite(x.grad).all()


def test_l2e_in_place_gradient_is_not_used_while_recording_a_graph() -> None:
    """With create_graph=True (a gradient graph being recorded) nothing is written in place."""
    inhibitor, x, weight = _mlp_with_l2e()
    expected = _reference_gradient(inhibitor, x, weight)
    seen: dict[str, int] = {}
    h = torch.nn.functional.gelu(x)
    h.register_hook(lambda grad: seen.__setitem__("activation", grad.data_ptr()))
    out = inhibitor(h)
    out.register_hook(lambda grad: seen.__setitem__("output", grad.data_ptr()))
    loss = torch.nn.functional.linear(out, weight).square().sum() + memel.auxiliary_loss(inhibitor)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    assert seen["activation"] != seen["output"]
    torch.testing.assert_close(grad.detach(), expected)


def test_gradient_ownership_sees_every_other_holder_of_the_storage() -> None:
    """The native ownership test on its own: a fresh tensor is plain and unshared; another
    tensor over its storage, a view whose base is held (a view made from Python always is:
    its base keeps a Python object), or a non-contiguous tensor is not. (A view whose base
    only autograd holds, the case that matters, is the in-place tests' above.)"""
    ownership = native.load().gradient_ownership
    plain = torch.randn(6, 4)
    assert ownership(plain)[1]
    extra = plain.detach()  # another tensor over the same storage
    assert not ownership(plain)[1]
    del extra
    assert ownership(plain)[1]
    assert not ownership(plain.view(2, 3, 4))[1]  # the base is held here
    assert not ownership(torch.randn(6, 4).view(2, 3, 4))[1]
    assert not ownership(torch.randn(4, 6).t())[1]  # not contiguous


def test_ownership_probe_waits_out_inference_mode_and_training_calls_run_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under inference mode the probe cannot run a backward: it is put off (not failed), and
    a training-mode call there still works; outside, the probe succeeds."""
    from memel.inhibition import module

    ownership = kernels.GradientOwnership()  # (a fresh one: the process's is calibrated already)
    monkeypatch.setattr(kernels, "OWNERSHIP", ownership)
    monkeypatch.setattr(module, "OWNERSHIP", ownership)
    with torch.inference_mode():
        assert ownership.calibrate() is False and not ownership._calibrated
        for mode in ("l2e", "rd"):
            inhibitor = memel.Inhibitor(mode=mode, late_start=1)
            inhibitor(torch.randn(4, 8))
            assert inhibitor(torch.randn(4, 8)).shape == (4, 8)
    assert ownership.calibrate() is native.available()


@pytest.mark.parametrize("order", ["sorted", "shuffled", "repeated"])
@pytest.mark.parametrize("shape", [(60,), (6, 10), (3, 4, 5), (2, 3, 2, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_gradient_native_and_torch_agree_and_are_coalesced_when_unique(
    order: str, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    """Both builders of l2e's sparse gradient equal index_add_ into zeros, and mark the tensor
    coalesced exactly when its indices are unique (sorting them first when they are not in order)."""
    generator = torch.Generator().manual_seed(len(shape))
    flat = torch.randperm(60, generator=generator)[:12].sort().values
    if order == "shuffled":
        flat = flat[torch.randperm(12, generator=generator)]
    elif order == "repeated":
        flat = torch.cat([flat[:6], flat[:6]])
    local = torch.randn(flat.numel(), generator=generator)
    grad_terms = torch.tensor(0.37)
    expected = torch.zeros(60, dtype=dtype).index_add_(0, flat, (local * grad_terms).to(dtype)).reshape(shape)
    native_sparse = native.native_sparse_gradient(flat, local, grad_terms, torch.Size(shape), dtype)
    torch_sparse = kernels._sparse_gradient(flat, (local * grad_terms).to(dtype), torch.Size(shape))
    for sparse in (native_sparse, torch_sparse):
        assert sparse.layout == torch.sparse_coo and sparse.dtype == dtype and sparse.shape == shape
        assert sparse.is_coalesced() == (order != "repeated")
        torch.testing.assert_close(sparse.to_dense(), expected)
        if sparse.is_coalesced():  # the flag is true: the same tensor as torch's own coalesce
            rebuilt = torch.sparse_coo_tensor(sparse._indices(), sparse._values(), shape).coalesce()
            assert torch.equal(rebuilt.indices(), sparse.indices())


def test_l2e_top_n_selections_come_in_increasing_order() -> None:
    """Mode l2e asks the native kernel for each sample's top-n in increasing neuron order (so
    the gradient's flat indices strictly increase), on the fused and the two-step path alike,
    the same neurons as without the ordering."""
    generator = torch.Generator().manual_seed(4)
    values = torch.randn(64, 40, generator=generator)
    mean, scale = torch.zeros(40), torch.rand(40, generator=generator) + 0.5
    ordered = native.native_measure(values, mean, scale, 5, 3.0, False, False, sorted_rows=True)[4]
    plain = native.native_measure(values, mean, scale, 5, 3.0, False, False)[4]
    assert bool((ordered[:, 1:] > ordered[:, :-1]).all())
    assert torch.equal(ordered, plain.sort(1).values)
    for stats_update in ("call", "step"):
        inhibitor = memel.Inhibitor(mode="l2e", top_n=5, late_start=1, stats_update=stats_update)
        inhibitor(values)
        memel.sync(inhibitor)
        seen: list[torch.Tensor] = []
        original = kernels.LogMSLoss.apply

        def spy(*args: object) -> object:
            seen.append(args[4])  # flat_index
            return original(*args)

        kernels.LogMSLoss.apply = spy  # type: ignore[method-assign]
        try:
            inhibitor(values + 0.1)
        finally:
            kernels.LogMSLoss.apply = original  # type: ignore[method-assign]
        assert bool((seen[0][1:] > seen[0][:-1]).all()), stats_update


def test_auxiliary_loss_sums_modules_and_never_counts_twice() -> None:
    config = memel.InhibitionConfig(mode="l2e", select="threshold", fraction=0.1, forget_steps=3, late_start=1)
    host = _host(config)
    assert memel.auxiliary_loss(host).item() == 0.0  # no forward yet
    inserted = memel.inhibitors(host)
    x = torch.randn(6, 8, 16, generator=torch.Generator().manual_seed(6))
    host(x)
    assert memel.auxiliary_loss(host).item() == 0.0  # first batch: no history, nothing selected

    # independent per-module losses from the input, phi, tau and the history mean of each call
    expected = {}

    def judge(module: memel.Inhibitor, args: tuple, name: str) -> None:
        z = args[0].detach().reshape(-1, 16)
        phi, tau = _judge(module, z)
        mu = module.statistics()["mean"]
        selected = phi >= tau
        assert selected.any() and not _near(phi, tau)
        expected[name] = torch.log((z - mu)[selected].square() + 1e-6).mean()

    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: judge(m, args, name))
        for name, module in inserted.items()
    ]
    host(x * 1.5)
    for h in hooks:
        h.remove()
    total = memel.auxiliary_loss(host)
    torch.testing.assert_close(total, sum(expected.values()), rtol=1e-5, atol=1e-6)
    assert total.requires_grad
    assert memel.auxiliary_loss(host).item() == 0.0  # consumed: never counted twice

    # two forwards before one call: the mean over both calls' selections, once
    host(x)
    host(x * 0.5)
    both = memel.auxiliary_loss(host)
    assert both.requires_grad and memel.auxiliary_loss(host).item() == 0.0

    # eval mode: no terms; switching to eval forgets unconsumed ones
    host(x)
    host.eval()
    host(x)
    assert memel.auxiliary_loss(host).item() == 0.0
    host.train()
    host(x)
    copy.deepcopy(host)  # pending terms (a graph) do not stop a copy
    assert memel.auxiliary_loss(host).requires_grad
    assert memel.auxiliary_loss(nn.Linear(2, 2)).item() == 0.0  # no Inhibitor at all


def test_auxiliary_loss_is_zero_when_nothing_is_selected_or_mode_is_not_l2e() -> None:
    constant = memel.Inhibitor(mode="l2e", select="threshold", forget_steps=2, late_start=1)
    for _ in range(3):
        out = constant(torch.full((4, 5), 2.0))  # phi = 0 < tau everywhere
    assert constant.window[0].sum().item() == 0
    assert memel.auxiliary_loss(constant).item() == 0.0
    rd = memel.Inhibitor(mode="rd", forget_steps=2, late_start=1)
    for _ in range(3):
        rd(torch.randn(4, 5))
    assert memel.auxiliary_loss(rd).item() == 0.0 and out.shape == (4, 5)


# ---------------------------------------------------------------------------------------
# data parallel: tau rides in the one collective
STEPS = 10
CONFIG = {
    "mode": "rd",
    "select": "threshold",
    "fraction": 0.05,
    "forget_steps": 3,
    "late_start": 2,
    "stats_update": "step",
}


def _data() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(21)
    # the two halves (one per rank) differ: a rank-local update would give different taus
    return [
        torch.cat([torch.randn(8, 6, 16, generator=generator), torch.randn(8, 6, 16, generator=generator) * 3 + 1])
        for _ in range(STEPS)
    ]


def _train(host: _Host, batches: list[torch.Tensor]) -> dict:
    record: dict = {"outputs": [], "taus": []}
    for batch in batches:
        out = host(batch)
        out.sum().backward()
        memel.sync(host)
        record["outputs"].append(out.detach())
        record["taus"].append([m.tau.clone() for m in memel.inhibitors(host).values()])
    return record


def _worker(rank: int, world_size: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    with counting_all_reduce() as calls:
        host = _host(memel.InhibitionConfig(**CONFIG))
        record = _train(host, [batch.chunk(world_size)[rank] for batch in _data()])
    record["all_reduce_calls"] = calls["all_reduce"]
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")


def test_two_ranks_share_tau_with_one_collective_per_step(tmp_path: Path) -> None:
    run_distributed(_worker, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = _train(_host(memel.InhibitionConfig(**CONFIG)), _data())
    for record in ranks:
        assert record["all_reduce_calls"] == STEPS  # the counts ride in the statistics' collective
    start = initial_threshold(0.05)
    for step in range(STEPS):
        for a, b, s in zip(ranks[0]["taus"][step], ranks[1]["taus"][step], single["taus"][step]):
            assert torch.equal(a, b)  # bit for bit on every rank
            torch.testing.assert_close(a, s, rtol=1e-9, atol=0)  # = one process on the whole batch
        both = torch.cat([ranks[0]["outputs"][step], ranks[1]["outputs"][step]])
        torch.testing.assert_close(both, single["outputs"][step], rtol=1e-5, atol=1e-5)
    assert all(abs(math.log(t.item() / start)) > 0.05 for t in single["taus"][-1])


# ---------------------------------------------------------------------------------------
# configuration
@pytest.mark.parametrize(
    ("message", "kwargs"),
    [
        (r"fraction=0\.05 is only used by select='threshold'", {"fraction": 0.05}),
        (r"threshold_rate=0\.2 is only used by select='threshold'", {"threshold_rate": 0.2}),
        (r"top_n=3 is only used by select='top_n'", {"select": "threshold", "top_n": 3}),
        (r"strength=2\.0 is Reverse Deactivation's D.*set l2e_weight", {"mode": "l2e", "strength": 2.0}),
        (r"l2e_weight=0\.1 is only used by mode 'l2e'.*set mode='l2e'", {"l2e_weight": 0.1}),
        (r"delta=0\.001 is only used by mode 'l2e'", {"mode": "rd", "delta": 1e-3}),
        (r"l2e_weight: Input should be greater than 0", {"mode": "l2e", "l2e_weight": 0.0}),
        (r"l2e_weight: .*finite number", {"mode": "l2e", "l2e_weight": float("inf")}),
        (r"delta: Input should be greater than 0", {"mode": "l2e", "delta": -1.0}),
        (r"fraction: Input should be less than 1", {"select": "threshold", "fraction": 1.0}),
        (r"fraction: Input should be greater than 0", {"select": "threshold", "fraction": 0.0}),
        (r"threshold_rate: Input should be less than or equal to 1", {"select": "threshold", "threshold_rate": 1.5}),
        (r"threshold_rate: Input should be greater than 0", {"select": "threshold", "threshold_rate": 0.0}),
        (r"select: Input should be 'top_n' or 'threshold'", {"select": "quantile"}),
    ],
)
def test_incompatible_options_fail_early_naming_the_field(message: str, kwargs: dict) -> None:
    with pytest.raises(memel.ConfigError, match=message):
        memel.InhibitionConfig(**kwargs)


def test_new_defaults_and_round_trip() -> None:
    config = memel.InhibitionConfig()
    assert (config.select, config.fraction, config.threshold_rate) == ("top_n", 0.02, 0.05)
    assert (config.l2e_weight, config.delta) == (1.0, 1e-6)
    for kwargs in ({}, {"mode": "l2e", "select": "threshold", "fraction": 0.03, "l2e_weight": 0.1, "delta": 1e-4}):
        config = memel.InhibitionConfig(**kwargs)
        assert memel.InhibitionConfig(**config.model_dump(mode="json")) == config
