"""The Python statistics path (the eager kernel, and what torch.distributed merges) against
NumPy float64: batch moments from shifted sums, Lemma 3.2 with the forget step, and MS."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import PaperStatistics, top_n

import memel
from memel.inhibition.statistics import Moments, merge_history


def _ragged_samples() -> list[np.ndarray]:
    """One sample array per neuron: none, one, two and several values, some tightly spread
    (sum of squared deviations below 1) and far from the shift."""
    generator = np.random.default_rng(5)
    return [
        np.array([]),
        np.array([4.25]),
        np.array([3.0, 3.5]),
        generator.normal(7.0, 0.05, size=9),
        generator.normal(-2.0, 3.0, size=11),
    ]


def test_moments_from_shifted_sums_match_numpy() -> None:
    """Count, mean and M2 per neuron from sums of (x - shift) and (x - shift)^2, as an
    all-reduce adds them up, equal NumPy's on the samples themselves."""
    samples = _ragged_samples()
    shift = torch.tensor([1.5, -0.5, 2.0, 6.0, 1.0], dtype=torch.float64)
    count = torch.tensor([float(len(x)) for x in samples], dtype=torch.float64)
    sum_shifted = torch.tensor([float(np.sum(x - s)) for x, s in zip(samples, shift.tolist())], dtype=torch.float64)
    sumsq_shifted = torch.tensor(
        [float(np.sum((x - s) ** 2)) for x, s in zip(samples, shift.tolist())], dtype=torch.float64
    )

    moments = Moments.from_shifted_sums(count, sum_shifted, sumsq_shifted, shift)

    expected_mean = [float(x.mean()) if len(x) else 0.0 for x in samples]
    expected_m2 = [float(((x - x.mean()) ** 2).sum()) if len(x) else 0.0 for x in samples]
    assert moments.count.tolist() == [0, 1, 2, 9, 11]
    np.testing.assert_allclose(moments.mean.numpy(), expected_mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(moments.m2.numpy(), expected_m2, rtol=1e-9, atol=1e-12)
    assert 0 < expected_m2[3] < 1  # the tight neuron: a floor at 1 would show


@pytest.mark.parametrize("sizes", [[1, 4, 1, 7, 5, 8], [1, 1, 4, 1, 7, 5]])
@pytest.mark.parametrize("forget_steps", [1, 3])
def test_merge_history_caps_the_history_at_forget_steps(forget_steps: int, sizes: list[int]) -> None:
    """Chained merges from an empty history follow Algorithm 1 batch by batch: the first batch
    alone, Lemma 3.2 while fewer than n_f batches are held, the capped weight from the n_f-th on;
    single-sample batches included (a history of one sample is a history, one sample a batch)."""
    generator = torch.Generator().manual_seed(9)
    batches = [torch.randn(size, 5, generator=generator, dtype=torch.float64) * 2 + 3 for size in sizes]
    batches[4] = batches[4] * 4 - 6  # a shift the capped history must follow
    reference = PaperStatistics(forget_steps=forget_steps)
    mean = torch.zeros(5, dtype=torch.float64)
    var = torch.zeros(5, dtype=torch.float64)
    count = torch.zeros(5, dtype=torch.int64)
    for index, batch in enumerate(batches):
        moments = Moments(
            torch.full((5,), float(batch.shape[0]), dtype=torch.float64),
            batch.mean(0),
            batch.var(0, correction=0) * batch.shape[0],
        )
        mean, var, count = merge_history(mean, var, count, index, moments, forget_steps)
        reference.update(batch.numpy())
        np.testing.assert_allclose(mean.numpy(), reference.mean, rtol=1e-12, atol=1e-12, err_msg=f"batch {index}")
        np.testing.assert_allclose(var.numpy(), reference.var, rtol=1e-10, atol=1e-12, err_msg=f"batch {index}")
        assert count.tolist() == reference.count.tolist()


def test_eager_kernel_statistics_selection_and_ms_follow_the_paper() -> None:
    """The eager kernel (the path on GPUs, merged in Python) past the forget step, on neurons
    whose variances span 0.01 to 900 (so eps * mean(var) decides the ranking, and differs from
    eps / mean(var)): MS, the top-n selected per sample, and the statistics after every batch
    (float32 mean and var, integer count) equal the NumPy reference."""
    n = 2
    config = memel.InhibitionConfig(mode="original", top_n=n, forget_steps=2, eps=0.05, kernel="eager")
    inhibitor = memel.Inhibitor(config)
    reference = PaperStatistics(forget_steps=2, eps=0.05)
    generator = torch.Generator().manual_seed(13)
    spread = torch.tensor([0.1, 0.5, 2.0, 5.0, 10.0, 30.0])
    batches = [torch.randn(size, 6, generator=generator) * spread + 4 for size in [7, 5, 9, 6, 8, 7]]
    batches[3] = batches[3] * 0.5 - 20
    for index, batch in enumerate(batches):
        if index:
            phi = reference.ms(batch.numpy())
            np.testing.assert_allclose(
                inhibitor.monosemantic_scale(batch).numpy(), phi, rtol=1e-5, err_msg=f"batch {index}"
            )
            before = inhibitor.window[0].clone()
            inhibitor(batch)
            selected = inhibitor.snapshot(reset=False).selected_count - before
            expected = np.bincount(top_n(phi, n).reshape(-1), minlength=6)
            np.testing.assert_array_equal(selected.numpy(), expected, err_msg=f"batch {index}")
        else:
            inhibitor(batch)
        reference.update(batch.numpy())
        stats = inhibitor.statistics()
        np.testing.assert_allclose(stats["mean"].numpy(), reference.mean, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(stats["var"].numpy(), reference.var, rtol=1e-5)
        assert stats["mean"].dtype == stats["var"].dtype == torch.float32 and stats["count"].dtype == torch.int64
        assert stats["count"].tolist() == reference.count.tolist() and stats["batches"] == index + 1
