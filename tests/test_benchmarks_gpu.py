"""The benchmarks run on a CUDA device with synchronized clocks (run with: pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

from memel.benchmarks.inhibition import bench_inhibition
from memel.benchmarks.overhead import bench_overhead
from memel.errors import ConfigError

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)"),
]


def test_bench_inhibition_times_eager_and_compiled_on_cuda() -> None:
    rows = bench_inhibition((2, 64, 256), top_ns=(1, 4), repeats=2, kernels=("eager", "compiled"), device="cuda")
    assert [(r.kernel, r.layout, r.top_n) for r in rows] == [
        (k, layout, n) for k in ("eager", "compiled") for layout in ("channel", "element") for n in (1, 4)
    ]
    for row in rows:
        assert row.module_ms > 0 and row.baseline_ms > 0 and row.warm_ms is None


def test_bench_inhibition_refuses_the_native_kernel_on_cuda() -> None:
    with pytest.raises(ConfigError, match="kernel: 'native' runs on CPU tensors only"):
        bench_inhibition((2, 8, 16), kernels=("native",), device="cuda")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bench_overhead_on_cuda_counts_module_time_from_cuda_events() -> None:
    rows = bench_overhead(
        "byte-0.2m", batch=2, seq=16, rounds=2, warmup=2, variants=("none", "rd", "l2e"), device="cuda"
    )
    by_name = {row.variant: row for row in rows}
    assert by_name["none"].module_share == 0.0 and by_name["none"].ratio == 1.0
    for name in ("rd", "l2e"):
        assert 0.0 < by_name[name].module_share < 1.0 and by_name[name].step_ms > 0
