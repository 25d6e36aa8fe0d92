"""The training run's diagnostics can fire: ``stats/rank_divergence`` is positive exactly when
ranks hold different statistics, and equals the largest difference."""

from __future__ import annotations

from pathlib import Path

import torch
from distributed import run_distributed
from torch import nn


def _divergence_worker(rank: int, world_size: int, out_dir: str) -> None:
    import memel
    from memel.training.trainer import rank_divergence

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
    inserted = memel.inhibit(model, "1", memel.InhibitionConfig(mode="original", stats_update="step"))
    for _ in range(3):
        model(torch.randn(4, 6, generator=torch.Generator().manual_seed(7)))
        memel.sync(model)
    agreed = rank_divergence(inserted, torch.device("cpu"))
    inhibitor = inserted["1"]
    if rank == 1:  # rank 1's view of one neuron drifts by a known amount
        inhibitor.mean[2] += 0.25
        inhibitor.var[4] += 0.5
    drifted = rank_divergence(inserted, torch.device("cpu"))
    torch.save({"agreed": agreed, "drifted": drifted}, Path(out_dir) / f"rank{rank}.pt")


def test_rank_divergence_is_zero_when_ranks_agree_and_the_largest_difference_otherwise(tmp_path: Path) -> None:
    run_distributed(_divergence_worker, 2, str(tmp_path))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["agreed"] == 0.0
        assert abs(result["drifted"] - 0.5) < 1e-6  # the var drift, the larger of the two
