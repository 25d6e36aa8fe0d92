"""The inhibition core on a CUDA device matches the CPU (run with: pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

import memel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)"),
]


@pytest.mark.parametrize("kernel", ["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(kernel: str, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 64, 256, generator=generator).to(dtype) for _ in range(6)]
    results = {}
    for device in ("cpu", "cuda"):
        inhibitor = memel.Inhibitor(mode="rd", top_n=4, forget_steps=3, late_start=2, kernel=kernel).to(device)
        outputs = []
        for batch in batches:
            z = batch.detach().to(device).requires_grad_(True)  # a leaf on each device
            out = inhibitor(z)
            out.float().square().sum().backward()
            outputs.append((out.detach().float().cpu(), z.grad.float().cpu()))
        results[device] = (
            outputs,
            {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inhibitor.statistics().items()},
        )
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for (cpu_out, cpu_grad), (gpu_out, gpu_grad) in zip(results["cpu"][0], results["cuda"][0]):
        torch.testing.assert_close(gpu_out, cpu_out, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(gpu_grad, cpu_grad, rtol=tolerance, atol=tolerance)
    for key in ("mean", "var"):
        assert results["cuda"][1][key].dtype == torch.float32
        torch.testing.assert_close(results["cuda"][1][key], results["cpu"][1][key], rtol=1e-4, atol=1e-5)
