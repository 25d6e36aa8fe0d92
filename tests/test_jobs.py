"""Every shipped training spec validates, and its model, data and objective fit together."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import memel
from memel.data import build as build_loader
from memel.models import build as build_model
from memel.training import load_spec
from memel.training.objective import compute
from memel.training.worker import insert_inhibition

JOBS = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))


@pytest.mark.parametrize("job", JOBS, ids=[job.stem for job in JOBS])
def test_job_trains_a_few_steps_in_process(job: Path) -> None:
    spec = load_spec(job, ["inhibition.late_start=1", "inhibition.forget_steps=1"])
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
