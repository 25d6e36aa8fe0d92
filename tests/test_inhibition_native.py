"""The fused C++ kernel (``kernel="native"``) against the eager one it replaces.

The first test to run builds the extension (about 30-60 s, then cached in torch's extensions
directory). Tests skip, with the build error, only where it genuinely cannot be built.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import memel
from memel.inhibition import kernels, native

pytestmark = pytest.mark.usefixtures("native_kernel")


def _case(samples: int, neurons: int, dtype: torch.dtype, seed: int, special: bool) -> tuple:
    """Random values (no ties within a row) with, optionally, NaN/+inf/-inf in some rows
    (at most one non-finite value per row, so that the top-n set is unique)."""
    generator = torch.Generator().manual_seed(seed)
    values = (torch.randn(samples, neurons, generator=generator) * 2 + 0.5).to(dtype)
    if special:
        rows = torch.randperm(samples, generator=generator)[: max(3, samples // 3)].tolist()
        for k, row in enumerate(rows):
            column = int(torch.randint(neurons, (1,), generator=generator))
            values[row, column] = (float("nan"), float("inf"), float("-inf"))[k % 3]
    mean = torch.randn(neurons, generator=generator) * 0.3
    scale = torch.rand(neurons, generator=generator) + 0.25
    return values.contiguous(), mean, scale


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32)


def _assert_same(values, mean, scale, top_n, track, copy, threads) -> None:
    eager = kernels.eager_measure(values, mean, scale, top_n, 3.0, track, copy)
    fused = native.native_measure(values, mean, scale, top_n, 3.0, track, copy, threads=threads)
    assert fused is not None
    sum_d, sum_d2, max_scaled, above, selected, copied = fused
    e_sum_d, e_sum_d2, e_max, e_above, e_selected, e_copy = eager
    # sums: within 1e-5 of the scale of the summed terms (d can cancel), same non-finite pattern
    d = values.double() - mean.double()
    spread = d.abs().nan_to_num(posinf=0.0).sum(0)
    assert sum_d.dtype == sum_d2.dtype == torch.float32
    finite = torch.isfinite(e_sum_d)
    assert torch.equal(finite, torch.isfinite(sum_d))
    assert torch.equal(torch.isnan(e_sum_d), torch.isnan(sum_d))
    assert ((sum_d - e_sum_d).abs()[finite].double() <= 1e-5 * spread[finite] + 1e-6).all()
    torch.testing.assert_close(sum_d2, e_sum_d2, rtol=1e-5, atol=1e-6, equal_nan=True)
    # selection: the same set per row
    assert selected.shape == e_selected.shape == (values.shape[0], top_n) and selected.dtype == torch.int64
    assert torch.equal(selected.sort(1).values, e_selected.sort(1).values)
    if track:
        assert max_scaled.dtype == torch.float32 and above.dtype == torch.int32
        torch.testing.assert_close(max_scaled, e_max, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(above, e_above)
    else:
        assert max_scaled is None and above is None
    if copy:
        assert copied.dtype == values.dtype and copied.is_contiguous() and copied.data_ptr() != values.data_ptr()
        assert torch.equal(_bits(copied), _bits(e_copy))
    else:
        assert copied is None


SHAPES = {
    "channel": (520, 300),  # many samples: row-parallel
    "element": (6, 9000),  # few samples, many neurons: column-parallel
    "tiny": (5, 33),  # single task
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("top_n", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan_inf"])
def test_native_equals_eager(shape: str, top_n: int, dtype: torch.dtype, special: bool) -> None:
    samples, neurons = SHAPES[shape]
    values, mean, scale = _case(samples, neurons, dtype, seed=top_n * 7 + samples, special=special)
    for track, copy in ((True, True), (False, False), (True, False), (False, True)):
        for threads in (1, 2, 3):
            _assert_same(values, mean, scale, top_n, track, copy, threads)


def test_native_float16_and_default_threads() -> None:
    values, mean, scale = _case(300, 257, torch.float16, seed=5, special=True)
    _assert_same(values, mean, scale, 4, True, True, threads=0)


def test_native_sums_are_accurate_over_many_samples() -> None:
    """4096 samples with a large offset: sums stay within ~1e-6 of float64."""
    generator = torch.Generator().manual_seed(11)
    values = torch.randn(4096, 64, generator=generator) * 3 + 50
    mean = torch.full((64,), 49.0)
    scale = torch.ones(64)
    sum_d, sum_d2, *_ = native.native_measure(values, mean, scale, 1, 3.0, False, False)
    d = values.double() - mean.double()
    torch.testing.assert_close(sum_d.double(), d.sum(0), rtol=1e-6, atol=1e-6 * d.abs().sum(0).max().item())
    torch.testing.assert_close(sum_d2.double(), d.square().sum(0), rtol=1e-6, atol=0.0)


def test_native_ties_and_nan_rank_like_torch() -> None:
    """Constant rows select the first index for top_n=1 (like argmax); NaN is selected first."""
    values = torch.zeros(200, 300)
    values[7, 5] = float("nan")
    values[9, 250] = float("nan")
    values[9, 3] = float("inf")
    mean, scale = torch.zeros(300), torch.ones(300)
    for threads in (1, 2, 3):
        _, _, max_scaled, above, selected, _ = native.native_measure(values, mean, scale, 1, 0.5, True, False, threads)
        expected = torch.zeros(200, 1, dtype=torch.int64)
        expected[7, 0], expected[9, 0] = 5, 250
        assert torch.equal(selected, expected)
        assert torch.isnan(max_scaled[5]) and torch.isnan(max_scaled[250]) and torch.isinf(max_scaled[3])
        assert int(above.sum()) == 1  # the inf; NaN is never above the threshold
        _, _, _, _, selected2, _ = native.native_measure(values, mean, scale, 2, 0.5, False, False, threads)
        assert set(selected2[9].tolist()) == {250, 3} and 5 in selected2[7].tolist()


@pytest.mark.parametrize("layout,shape", [("channel", (4, 130, 96)), ("element", (6, 8, 1200))])
def test_native_kernel_matches_eager_end_to_end(layout: str, shape: tuple[int, ...]) -> None:
    """memel.Inhibitor(kernel="native") selects, modifies, back-propagates and tracks like eager."""
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(*shape, generator=generator) * (1 + 0.2 * i) + 0.1 * i for i in range(6)]
    upstream = [torch.randn(*shape, generator=generator) for _ in batches]
    results = {}
    for kernel in ("eager", "native"):
        inhibitor = memel.Inhibitor(
            mode="rd",
            strength=2.0,
            top_n=3,
            layout=layout,
            forget_steps=2,
            late_start=1,
            track_every=2,
            kernel=kernel,
        )
        outputs, grads, snaps = [], [], []
        for batch, grad in zip(batches, upstream):
            z = batch.clone().requires_grad_(True)
            out = inhibitor(z)
            out.backward(grad)
            outputs.append(out.detach())
            grads.append(z.grad)
            if len(outputs) == 3:
                snaps.append(inhibitor.snapshot())
        snaps.append(inhibitor.snapshot())
        results[kernel] = (outputs, grads, inhibitor.statistics(), snaps)
    (eo, eg, es, esnaps), (no, ng, ns, nsnaps) = results["eager"], results["native"]
    for a, b in zip(eo + eg, no + ng):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.equal(eo[-1], batches[-1])  # values really were inhibited
    for key in ("mean", "var"):
        torch.testing.assert_close(es[key], ns[key], rtol=1e-5, atol=1e-6)
    assert torch.equal(es["count"], ns["count"]) and es["batches"] == ns["batches"]
    for a, b in zip(esnaps, nsnaps):
        assert torch.equal(a.selected_count, b.selected_count)
        assert torch.equal(a.inhibited_count, b.inhibited_count)
        torch.testing.assert_close(a.max_ms, b.max_ms, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.mean_ms, b.mean_ms, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.frac_above, b.frac_above, rtol=0, atol=0)


def test_native_falls_back_to_eager_with_one_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No compiler (a failed build) or an unsupported dtype: eager results, one warning each."""
    values, mean, scale = _case(40, 30, torch.float32, seed=1, special=False)
    expected = kernels.measure(values, mean, scale, 2, 3.0, True, True, "eager")
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", "RuntimeError: Ninja is required to load C++ extensions")
    monkeypatch.setattr(native, "_warned", set())
    with pytest.warns(RuntimeWarning, match="could not be built"):
        got = kernels.measure(values, mean, scale, 2, 3.0, True, True, "native")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = kernels.measure(values, mean, scale, 2, 3.0, True, True, "native")  # warned once only
    for result in (got, again):
        assert torch.equal(result.selected, expected.selected) and torch.equal(result.sum_d, expected.sum_d)
    monkeypatch.undo()
    monkeypatch.setattr(native, "_warned", set())
    with pytest.warns(RuntimeWarning, match="supports CPU float32/bfloat16/float16"):
        got = kernels.measure(values.double(), mean, scale, 2, 3.0, True, False, "native")
    assert torch.equal(
        got.selected,
        kernels.measure(values.double(), mean, scale, 2, 3.0, True, False).selected,
    )


def test_native_build_failure_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build that raises (no compiler) leaves load() returning None with a warning."""
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", None)
    monkeypatch.setattr(native, "_warned", set())
    with pytest.warns(RuntimeWarning, match="Ninja is required"):
        assert native.load() is None
    assert not native.available()


def test_native_large_copy_uses_its_own_buffer_and_autograd_accepts_it() -> None:
    """Copies of 4 MiB and more come from a huge-page buffer: same contents, usable in place."""
    values, mean, scale = _case(1100, 1000, torch.float32, seed=8, special=True)
    _assert_same(values, mean, scale, 3, True, True, threads=0)
    inhibitors = {
        k: memel.Inhibitor(mode="rd", top_n=2, late_start=1, forget_steps=2, kernel=k) for k in ("eager", "native")
    }
    for batch in (
        values.nan_to_num(0.0, 0.0, 0.0),
        values.nan_to_num(0.0, 0.0, 0.0) * 0.5 + 1,
    ):
        outs = {}
        for kernel, inhibitor in inhibitors.items():
            z = batch.clone().requires_grad_(True)
            out = inhibitor(z)
            out.square().sum().backward()
            outs[kernel] = (out.detach(), z.grad)
        for a, b in zip(outs["eager"], outs["native"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.fixture
def both_passes():
    """Runs a function with the kernel's register-blocked AVX-512 pass off, then on;
    skips where this CPU cannot run it (the portable pass is then the only one)."""
    if not native.set_vector_path(True):
        pytest.skip("this CPU has no AVX-512 (F, DQ, BW, VL): only the portable pass runs")

    def run(function):
        results = []
        for enabled in (False, True):
            native.set_vector_path(enabled)
            try:
                results.append(function())
            finally:
                native.set_vector_path(True)
        return results

    return run


def _raw(results) -> list:
    """Every tensor's raw bits, for bit-for-bit comparison (NaNs as one NaN: which NaN a sum
    of NaN and inf terms gives depends on operand order, and means nothing)."""

    def raw(r: torch.Tensor) -> torch.Tensor:
        if r.dtype != torch.float32:
            return r
        return torch.where(r.isnan(), torch.full_like(r, float("nan")), r).view(torch.int32)

    return [None if r is None else raw(r) for r in results]


@pytest.mark.parametrize("shape", [(520, 300), (6, 9000), (5, 33), (70, 2100), (3, 1)])
def test_vector_pass_gives_the_same_bits_as_the_portable_pass(both_passes, shape: tuple[int, int]) -> None:
    """Same sums, maxima, counts, selections and copy, bit for bit, on every work split
    (rows, columns, one task), partial chunks, several tiles per row and NaN/inf."""
    values, mean, scale = _case(*shape, torch.float32, seed=shape[1], special=True)
    for threads in (1, 2, 3):
        for track, copy in ((True, True), (False, False), (True, False), (False, True)):
            portable, vector = both_passes(
                lambda: native.native_measure(values, mean, scale, 1, 3.0, track, copy, threads=threads)
            )
            for a, b in zip(_raw(portable), _raw(vector), strict=True):
                assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("shape", [(520, 300), (6, 9000), (5, 33), (70, 2100)])
@pytest.mark.parametrize("level", [0.0, 1.5, 1e9], ids=["everything", "some", "nothing"])
def test_vector_pass_threshold_selection_gives_the_same_bits(both_passes, shape: tuple[int, int], level: float) -> None:
    """Threshold selection: the same hits in the same (row-major) order, with NaN counted above."""
    values, mean, scale = _case(*shape, torch.float32, seed=shape[0], special=True)
    for threads in (1, 2, 3):
        for track, copy in ((True, True), (False, False)):
            portable, vector = both_passes(
                lambda: native.native_measure(
                    values, mean, scale, 1, 3.0, track, copy, threads=threads, select_threshold=level
                )
            )
            for a, b in zip(_raw(portable), _raw(vector), strict=True):
                assert (a is None and b is None) or torch.equal(a, b)


def test_vector_pass_ties_pick_the_first_index(both_passes) -> None:
    """Equal keys across chunks and tiles: each row selects its first maximum (like argmax)."""
    values = torch.zeros(96, 2100)
    values[:, 40] = values[:, 1500] = values[:, 2099] = 3.0  # the same max in three chunks, two tiles
    values[5, 7] = 3.0
    mean, scale = torch.zeros(2100), torch.ones(2100)
    for threads in (1, 2):
        portable, vector = both_passes(lambda: native.native_measure(values, mean, scale, 1, 3.0, True, False, threads))
        assert torch.equal(portable[4], vector[4])
        expected = torch.full((96, 1), 40, dtype=torch.int64)
        expected[5, 0] = 7
        assert torch.equal(vector[4], expected)


def test_vector_pass_in_the_fused_training_path(both_passes) -> None:
    """An Inhibitor trained on the same batches holds the same statistics, trackers and outputs."""

    def train():
        inhibitor = memel.Inhibitor(mode="rd", forget_steps=3, late_start=2)
        generator = torch.Generator().manual_seed(4)
        outputs = []
        for step in range(6):
            batch = torch.randn(8, 40, 333, generator=generator) * (1 + step) + step
            outputs.append(inhibitor(batch.requires_grad_(True)).detach().clone())
        snap = inhibitor.snapshot()
        return [
            *outputs,
            snap.mean,
            snap.var,
            snap.count,
            snap.max_ms,
            snap.mean_ms,
            snap.frac_above,
            snap.selected_count,
        ]

    portable, vector = both_passes(train)
    for a, b in zip(_raw(portable), _raw(vector), strict=True):
        assert torch.equal(a, b)
