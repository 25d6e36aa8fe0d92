"""Every shipped job spec validates, and its (smallest) model, data and objective fit together."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import memel
from memel.data import build as build_loader
from memel.models import build as build_model
from memel.models import count_parameters
from memel.orchestration import expand_sweep, load_job
from memel.training import TrainSpec
from memel.training.objective import compute
from memel.training.worker import insert_inhibition

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("job", JOBS, ids=[job.stem for job in JOBS])
def test_job_trains_a_few_steps_in_process(job: Path) -> None:
    loaded = load_job(job, ["inhibition.late_start=1", "inhibition.forget_steps=1"])
    specs = [member.spec for member in expand_sweep(loaded)] if loaded.sweep else [TrainSpec(**loaded.base_tree())]
    # the smallest member that modifies values (original only tracks)
    spec = min(
        specs, key=lambda s: (s.inhibition.mode == "original", count_parameters(s.model.name, **s.model.overrides))
    )
    if any(str(path).startswith("s3://") for path in spec.data.get("paths", [])):
        assert spec.train.use_gpu, f"{job.name}: a spec whose data lives on S3 is a cluster job"
        pytest.skip(f"{job.name}: data on S3 and GPU workers (a cluster job); validated only")
    torch.manual_seed(0)
    model = build_model(spec.model.name, **spec.model.overrides)
    inserted = insert_inhibition(model, spec)
    assert inserted, "every shipped job inhibits somewhere"
    loader = build_loader({**spec.data, "batch_size": 2, "seed": 0}, rank=1, world_size=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.train.lr)
    kind = spec.data.get("kind", "text_lm")
    for _ in range(3):
        out = compute(model, next(loader), kind, torch.device("cpu"))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        memel.sync(model)
        assert math.isfinite(float(out.loss.detach()))
    inhibited = sum(int(m.snapshot().inhibited_count.sum()) for m in inserted.values())
    assert inhibited > 0, "inhibition must act once the late start has passed"
