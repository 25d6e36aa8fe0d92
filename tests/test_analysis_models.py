"""memel analyze's model-level computations against independent NumPy/autograd reproductions:
per-sample losses and feature groups of held-out data, and checkpoint loading (weights, Inhibitors,
the optimizer of a ZeRO-2 run); the case study (Table 4) is in test_case_study.py, the probe and
its ablation (Figure 2) in test_probing.py."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

import memel
from memel.analysis.heldout import grouped_batches, heldout_loader, sample_groups, sample_losses
from memel.data.documents import Document
from memel.training.objective import compute


class Batch(NamedTuple):
    inputs: torch.Tensor
    targets: torch.Tensor


def tiny_mlp(seed: int = 0, hidden: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict(fc1=nn.Linear(6, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, 3)))


# ------------------------------------------------------------------------------ held-out data
@pytest.mark.parametrize(
    ("model_name", "data"),
    [
        ("byte-0.2m", {"kind": "text_lm", "corpus": "shakespeare", "seq_len": 32}),
        ("bert-byte-tiny", {"kind": "text_classification", "task": "prose_vs_code", "seq_len": 32}),
    ],
)
def test_sample_losses_add_up_to_the_objective(model_name: str, data: dict) -> None:
    from memel.models import build

    torch.manual_seed(0)
    model = build(model_name).eval()
    batch, _ = next(grouped_batches(data, 4, 1))
    with torch.no_grad():
        losses, items = sample_losses(model, batch, data["kind"])
        expected = compute(model, batch, data["kind"], torch.device("cpu"))
    assert float(losses.sum() / items.sum()) == pytest.approx(float(expected.loss), rel=1e-5)
    assert float(items.sum()) == expected.items


def test_groups_of_lm_windows_are_their_documents_corpora() -> None:
    data = {"kind": "text_lm", "corpus": "mixed", "seq_len": 64, "heldout_fraction": 0.2}
    loader = heldout_loader(data, 8)
    docs = [s for s in loader.stream.segments if isinstance(s, Document)]
    starts, position = [], 0
    for doc in docs:  # documents joined by the 2-byte separator "\n\n"
        starts.append(position)
        position += doc.size + 2
    assert len({d.label for d in docs}) >= 2
    indices = np.linspace(0, loader.num_examples() - 1, 200).astype(int)
    groups = sample_groups(loader, indices, None)
    for index, found in zip(indices, groups, strict=True):
        offset = int(index) * 64
        owner = max(i for i, s in enumerate(starts) if s <= offset)
        if offset >= starts[owner] + docs[owner].size:  # inside the separator: the next document
            owner += 1
        assert found == ["all", docs[owner].label]


def test_groups_of_classes_features_and_featureless_data() -> None:
    batch, groups = next(
        grouped_batches({"kind": "text_classification", "task": "prose_vs_code", "seq_len": 32}, 16, 1)
    )
    assert [g[1] for g in groups] == [["prose", "code"][int(t)] for t in batch.targets]
    batch, groups = next(grouped_batches({"kind": "sparse_features", "num_features": 5, "active_prob": 0.5}, 8, 1))
    assert groups == [["all", *(f"feature {k}" for k in np.flatnonzero(row))] for row in batch.features.numpy()]
    _, groups = next(grouped_batches({"kind": "digits"}, 8, 1))
    assert groups == [["all"]] * 8
    assert len(list(grouped_batches({"kind": "digits"}, 8, 3))) == 3


# ------------------------------------------------------------------------------ checkpoints
def test_load_member_from_a_zero0_checkpoint(tmp_path: Path) -> None:
    from memel.analysis.checkpoint import load_member
    from memel.analysis.source import member_from_spec
    from memel.models import build, preset_targets
    from memel.training import TrainSpec

    spec = TrainSpec(name="ckpt", model={"name": "byte-0.2m"}, inhibition={"mode": "rd", "kernel": "eager"})
    torch.manual_seed(4)
    model = build("byte-0.2m")
    inserted = memel.inhibit(model, preset_targets("byte-0.2m", "mlp"), spec.inhibition)
    model.train()
    model(torch.randint(0, 256, (2, 16)))
    memel.sync(model)
    tag = tmp_path / "step-000000007"
    tag.mkdir()
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    (tmp_path / "memel").mkdir()
    torch.save({n: m.state_dict() for n, m in inserted.items()}, tmp_path / "memel" / "inhibition.pt")
    (tmp_path / "memel" / "progress.json").write_text(json.dumps({"step": 7, "tag": "step-000000007"}))
    member = member_from_spec("run-c", spec.model_dump(mode="json"), "m", {"checkpoint": str(tmp_path)})
    trained = load_member(member)
    memel.remove(model)
    assert trained.step == 7 and trained.kind == "text_lm" and not trained.model.training
    assert trained.model.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(trained.model.state_dict()[k], v) for k, v in model.state_dict().items())
    again = trained.insert(mode="original")
    for name, module in again.items():
        assert module.config.mode == "original" and torch.equal(module.mean, inserted[name].mean)


def _train_zero2(rank: int, world: int, folder: str) -> None:
    """Two ranks of a real DeepSpeed ZeRO-2 run on the same batches (so the averaged gradient is the
    local one); rank 0 also steps a plain torch AdamW replica and saves its state by parameter name."""
    import os

    import deepspeed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.manual_seed(0)
    model = tiny_mlp(5)
    replica = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    config = {
        "train_batch_size": 2 * world,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    reference = torch.optim.AdamW(replica.parameters(), lr=3e-3, weight_decay=0.05)
    for step in range(3):
        x = torch.randn(2, 6, generator=torch.Generator().manual_seed(step))
        y = torch.tensor([step % 3, (step + 1) % 3])
        loss = nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        reference.zero_grad()
        nn.functional.cross_entropy(replica(x), y).backward()
        torch.nn.utils.clip_grad_norm_(replica.parameters(), 1.0)  # DeepSpeed's default gradient_clipping
        reference.step()
    engine.save_checkpoint(folder, tag="step-3")
    if rank == 0:
        named = dict(replica.named_parameters())
        torch.save({name: reference.state[p] for name, p in named.items()}, Path(folder) / "reference.pt")


@pytest.mark.timeout(300)
def test_optimizer_state_of_a_zero2_checkpoint_is_the_optimizers(tmp_path: Path) -> None:
    from distributed import run_distributed

    from memel.analysis.checkpoint import optimizer_state

    run_distributed(_train_zero2, 2, str(tmp_path))
    names = [name for name, _ in tiny_mlp(5).named_parameters()]
    got = optimizer_state(tmp_path, "step-3", names, grad_clip=1.0)
    expected = torch.load(tmp_path / "reference.pt", weights_only=False)
    assert (got.lr, got.betas, got.eps, got.weight_decay, got.grad_clip) == (3e-3, (0.9, 0.999), 1e-8, 0.05, 1.0)
    assert sorted(got.state) == sorted(names)
    for name in names:
        assert float(got.state[name]["step"]) == 3.0
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                got.state[name][key].reshape(expected[name][key].shape), expected[name][key], msg=name
            )
