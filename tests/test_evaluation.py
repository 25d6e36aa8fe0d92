"""The periodic held-out evaluation scores the same fixed batches every time: spread evenly over
the held-out set, split across ranks without overlap, for every data kind with a held-out split;
its ``eval/loss`` equals an independent computation on those batches and changes only with the model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from distributed import run_distributed
from torch import nn

from memel import data
from memel.data import FixedBatches
from memel.training.callbacks import Callback
from memel.training.engine import TorchEngine
from memel.training.evaluation import HeldoutEvaluation
from memel.training.spec import TrainSpec
from memel.training.trainer import Schedule, Trainer

BATCH, BATCHES = 4, 3


def _glue(root: Path) -> dict[str, Any]:
    root.mkdir()
    (root / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"train {i}\t{i % 2}\n" for i in range(20)))
    (root / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"dev {i}\t{i % 2}\n" for i in range(50)))
    return dict(kind="glue", path=str(root), seq_len=8)


def _image_folder(root: Path) -> dict[str, Any]:
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(60):
            np.save(root / cls / f"{i}.npy", np.full((4, 4, 3), i, dtype=np.uint8))
    return dict(kind="image_folder", path=str(root), heldout_fraction=0.5)


KINDS = {
    "text_lm": lambda root: dict(kind="text_lm", corpus="shakespeare", seq_len=16),
    "text_classification": lambda root: dict(kind="text_classification", task="edition", seq_len=32),
    "glue": _glue,
    "digits": lambda root: dict(kind="digits"),
    "image_folder": _image_folder,
    "nowcast": lambda root: dict(kind="nowcast", samples_per_epoch=200, size=16, input_frames=2, output_frames=2),
    "sparse_features": lambda root: dict(kind="sparse_features", samples_per_epoch=300),
    "planted_text": lambda root: dict(kind="planted_text", seq_len=32),
}


def _heldout(config: dict[str, Any], rank: int = 0, world: int = 1) -> Any:
    return data.build({**config, "batch_size": BATCH, "split": "heldout"}, rank, world)


def _rows(batches: Any) -> list[tuple]:
    return [tuple(row.flatten().tolist()) for batch in batches for row in batch[0]]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fixed_heldout_batches_are_spread_disjoint_across_ranks_and_the_same_every_pass(kind, tmp_path) -> None:
    config = KINDS[kind](tmp_path / "data")
    total = _heldout(config).num_examples()
    count = BATCHES * BATCH * 2
    assert total > 2 * count, "the held-out set must be larger than the fixed choice for this test"
    shares = [FixedBatches(_heldout(config, rank, 2), BATCHES) for rank in range(2)]
    chosen = np.sort(np.concatenate([share.indices for share in shares]))
    # the union over the ranks: count distinct examples, none twice, evenly spaced from the first to the last
    assert len(chosen) == count and len(set(chosen.tolist())) == count
    gaps = np.diff(chosen)
    assert chosen[0] == 0 and chosen[-1] < total and chosen[-1] >= total - total // count - 1
    assert gaps.max() - gaps.min() <= 1
    for rank, share in enumerate(shares):
        assert len(share) == BATCHES
        first, second = list(share), list(share)
        assert _rows(first) == _rows(second), "every pass yields the same batches"
        assert [len(batch[0]) for batch in first] == [BATCH] * BATCHES
        direct = _heldout(config, rank, 2)  # an independently built loader: the same examples' contents
        assert _rows(first) == _rows([direct.fetch(share.indices)])


def test_more_batches_than_the_heldout_set_holds_score_each_example_once() -> None:
    config = dict(kind="sparse_features", samples_per_epoch=21)
    shares = [FixedBatches(_heldout(config, rank, 2), 100) for rank in range(2)]
    chosen = sorted(np.concatenate([share.indices for share in shares]).tolist())
    assert chosen == list(range(20)), "all but the remainder of an even split, each once"
    assert [len(share.indices) for share in shares] == [10, 10]


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(256, 8), nn.Linear(8, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(tokens)))


class EvalRecorder(Callback):
    def __init__(self) -> None:
        self.evaluations: dict[int, dict[str, float]] = {}

    def on_eval(self, step: int, metrics: Mapping[str, float]) -> bool:
        self.evaluations[step] = dict(metrics)
        return False


LM_DATA = {"kind": "text_lm", "corpus": "shakespeare", "seq_len": 16}


def _spec(workers: int = 1) -> TrainSpec:
    train = {"micro_batch_size": BATCH, "global_batch_size": BATCH * workers, "workers": workers, "seed": 3}
    return TrainSpec(data=LM_DATA, inhibition=None, train=train, eval={"every": 2, "batches": BATCHES})


def _independent_loss(model: nn.Module, indices: np.ndarray) -> float:
    """Mean next-token cross-entropy over the given held-out windows, in float64, in one batch."""
    batch = data.build({**LM_DATA, "batch_size": 1, "split": "heldout", "seed": 3}).fetch(np.sort(indices))
    with torch.no_grad():
        logits = model(batch.inputs).double()
    nll = -torch.log_softmax(logits, -1).gather(-1, batch.targets.unsqueeze(-1))
    return float(nll.mean())


def test_evaluations_of_an_unchanged_model_at_different_steps_agree_and_equal_a_direct_computation() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    engine = TorchEngine(model, torch.optim.SGD(model.parameters(), lr=0.0))  # the model never changes
    spec = _spec()
    train = data.build({**LM_DATA, "batch_size": BATCH, "seed": 3})
    recorder = EvalRecorder()
    evaluation = HeldoutEvaluation(spec, "text_lm", torch.device("cpu"), 0, 1)
    trainer = Trainer(
        engine, train, "text_lm", Schedule(steps=6, eval_every=2), callbacks=[recorder], evaluator=evaluation
    )
    trainer.fit()
    losses = [recorder.evaluations[step]["eval/loss"] for step in (2, 4, 6)]
    assert losses[0] == losses[1] == losses[2]
    assert len(evaluation.fixed.indices) == BATCHES * BATCH
    assert losses[0] == pytest.approx(_independent_loss(model, evaluation.fixed.indices), rel=1e-6)
    assert recorder.evaluations[2]["eval/perplexity"] == pytest.approx(np.exp(losses[0]), rel=1e-9)


def _two_rank_worker(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same model on both ranks
    model = TinyLM()
    engine = TorchEngine(model, torch.optim.SGD(model.parameters(), lr=0.0))
    evaluation = HeldoutEvaluation(_spec(world), "text_lm", torch.device("cpu"), rank, world)
    losses = [evaluation.periodic(engine)["eval/loss"] for _ in range(2)]
    result = {"losses": losses, "indices": evaluation.fixed.indices.tolist()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def test_two_ranks_score_the_fixed_set_once_and_agree_on_its_loss(tmp_path: Path) -> None:
    run_distributed(_two_rank_worker, 2, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    union = results[0]["indices"] + results[1]["indices"]
    assert len(union) == len(set(union)) == BATCHES * BATCH * 2
    assert not set(results[0]["indices"]) & set(results[1]["indices"])
    assert results[0]["losses"][0] == results[0]["losses"][1] == results[1]["losses"][0] == results[1]["losses"][1]
    torch.manual_seed(0)
    model = TinyLM()
    assert results[0]["losses"][0] == pytest.approx(_independent_loss(model, np.array(union)), rel=1e-6)
