"""Fine-tuning from a pretrained checkpoint (``model.init_from``) and the full held-out evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from memel.cli import app

RUNNER = CliRunner(env={"COLUMNS": "200"})
JOBS = Path(__file__).resolve().parents[1] / "jobs" / "paper"
DATA = ["data.heldout_fraction=0.0006"]  # 130 held-out passages: 65 per rank, not whole batches of 8
TINY = ["train.global_batch_size=16", "train.micro_batch_size=8", "train.log_every=2", "eval.every=2", "eval.batches=1"]


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip().startswith("error:")]


@pytest.mark.parametrize("command", ["run", "validate"])
def test_a_missing_checkpoint_is_refused_before_anything_starts(command: str, tmp_path: Path) -> None:
    import ray

    out = tmp_path / "out"
    missing = f"model.init_from={tmp_path / 'nope'}"
    result = RUNNER.invoke(
        app, [command, str(JOBS / "gain_encoder_finetune.yaml"), "--set", missing, "--set", f"output_dir={out}"]
    )
    assert result.exit_code == 2, result.output
    assert len(_error_lines(result.output)) == 1 and "model.init_from: no such path" in result.output, result.output
    assert "Traceback" not in result.output and not out.exists() and not ray.is_initialized()


def test_train_refuses_a_folder_that_is_not_a_finished_run(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    tree = yaml.safe_load((JOBS / "gain_encoder_pretrain.yaml").read_text())
    sweep = tmp_path / "sweep"
    (sweep / "members" / "m-original-s0").mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "summary.json").write_text(json.dumps({"checkpoint": None}))
    for folder, message in (
        (sweep, "is a sweep folder; name one of its members, e.g. .*m-original-s0"),
        (unfinished, "names no checkpoint"),
        (tmp_path, "is not a checkpoint"),
    ):
        spec.write_text(yaml.safe_dump({**tree, "model": {**tree["model"], "init_from": str(folder)}}))
        result = RUNNER.invoke(app, ["train", str(spec), "--set", f"output_dir={tmp_path / 'out'}"])
        assert result.exit_code == 2 and len(_error_lines(result.output)) == 1, result.output
        import re

        assert re.search(f"model.init_from: .*{message}", " ".join(result.output.split())), result.output
        assert not (tmp_path / "out").exists()


def _heldout_reference(member_dir: Path) -> tuple[float, float, int]:
    """Loss and accuracy of a finished run's checkpoint on its whole held-out set, computed with the
    analysis code's own loader and per-sample losses (no training code)."""
    import torch

    from memel.analysis.checkpoint import load_member
    from memel.analysis.heldout import heldout_loader, sample_losses
    from memel.analysis.source import member_from_spec

    run = json.loads((member_dir / "run.json").read_text())
    summary = json.loads((member_dir / "summary.json").read_text())
    member = member_from_spec(run["run_id"], json.loads((member_dir / "spec.json").read_text()), "pretrain", summary)
    trained = load_member(member)
    loader = heldout_loader(trained.spec.data, 64)
    loader.drop_last = False
    loss = correct = items = 0.0
    with torch.no_grad():
        for batch in loader:
            losses, counts = sample_losses(trained.model, batch, "text_classification")
            loss += float(losses.sum())
            items += float(counts.sum())
            correct += float((trained.model(batch.inputs).argmax(-1) == batch.targets).sum())
    return loss / items, correct / items, int(items)


def test_a_fine_tune_starts_from_the_pretrained_weights(tmp_path: Path) -> None:
    """Step 0 of the fine-tune scores exactly what the pretrained checkpoint scores on the full
    held-out set (and what an independent evaluation of the checkpoint gives)."""
    import torch

    from memel.data import build as build_loader
    from memel.models import build as build_model
    from memel.training import load_spec, run_training

    pretrained = tmp_path / "pretrain"
    spec = load_spec(
        JOBS / "gain_encoder_pretrain.yaml",
        [*DATA, *TINY, "train.steps=6", "train.workers=1", "checkpoint.every=6", f"output_dir={pretrained}"],
    )
    first = run_training(spec)
    loss, accuracy, items = _heldout_reference(pretrained)
    held = build_loader({**spec.data, "batch_size": 8, "split": "heldout"}).num_examples()
    assert items == held == first.metrics["heldout/items"] and (held // 2) % 8
    assert first.metrics["heldout/loss"] == pytest.approx(loss, rel=1e-5)
    assert first.metrics["heldout/accuracy"] == pytest.approx(accuracy)

    inhibition = "inhibition={mode: rd, layout: element, top_n: 1, forget_steps: 1, late_start: 1}"
    tuned = load_spec(
        JOBS / "gain_encoder_pretrain.yaml",
        [
            *DATA,
            *TINY,
            "train.steps=2",
            "train.workers=2",
            "checkpoint.every=2",
            "train.seed=3",
            "model.targets=[layers.0, layers.1]",
            inhibition,
            f"model.init_from={pretrained}",
            f"output_dir={tmp_path / 'tune'}",
        ],
    )
    second = run_training(tuned)
    assert second.metrics["init/items"] == held, "the full held-out set, every sample once, across 2 ranks"
    assert second.metrics["init/loss"] == pytest.approx(loss, rel=1e-5)
    assert second.metrics["init/accuracy"] == pytest.approx(accuracy)
    assert second.metrics["heldout/items"] == held and "heldout/loss" in second.metrics

    torch.manual_seed(tuned.train.seed)  # what the fine-tune would start from without init_from
    fresh = build_model(tuned.model.name)
    fresh.eval()
    batch = next(iter(build_loader({**spec.data, "batch_size": held, "split": "heldout", "shuffle": False})))
    with torch.no_grad():
        fresh_loss = float(torch.nn.functional.cross_entropy(fresh(batch.inputs), batch.targets))
    assert not math.isclose(fresh_loss, loss, rel_tol=1e-3), "the pretrained weights must differ from a fresh model's"


def test_the_final_nowcast_evaluation_gives_b_mse_and_b_mae_over_every_sequence() -> None:
    """Batch-wise sums of the balanced errors equal B-MSE / B-MAE computed on all held-out sequences at once."""
    import torch

    from memel.data import build as build_loader
    from memel.models import build as build_model
    from memel.models.nowcasting_metrics import b_mae, b_mse
    from memel.training.evaluation import evaluate

    class Engine(torch.nn.Module):  # what evaluate needs of a DeepSpeed engine: call it, and .module
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

    torch.manual_seed(0)
    model = build_model("convgru")
    data = {
        "kind": "nowcast",
        "size": 16,
        "input_frames": 2,
        "output_frames": 3,
        "samples_per_epoch": 7,
        "split": "heldout",
        "shuffle": False,
        "epochs": 1,
        "drop_last": False,
        "batch_size": 3,
    }
    metrics = evaluate(Engine(model), build_loader(data), 100, "nowcast", torch.device("cpu"), count=True)
    everything = next(iter(build_loader({**data, "batch_size": 7})))
    model.eval()
    with torch.no_grad():
        prediction = model(everything.inputs, 3).float()
    assert metrics["eval/items"] == 7
    assert metrics["eval/b_mse"] == pytest.approx(float(b_mse(prediction, everything.targets.float())), rel=1e-5)
    assert metrics["eval/b_mae"] == pytest.approx(float(b_mae(prediction, everything.targets.float())), rel=1e-5)
    assert metrics["eval/b_mse"] > 0


@pytest.mark.parametrize("value", ["some", "0", "true"])
def test_a_bad_final_evaluation_is_refused(value: str, tmp_path: Path) -> None:
    result = RUNNER.invoke(
        app,
        [
            "train",
            str(JOBS / "gain_encoder_pretrain.yaml"),
            "--set",
            f"eval.final={value}",
            "--set",
            f"output_dir={tmp_path / 'out'}",
        ],
    )
    assert result.exit_code == 2 and len(_error_lines(result.output)) == 1, result.output
    assert "eval.final: use all (every held-out sample once) or a number of batches >= 1" in " ".join(
        result.output.split()
    )
    assert not (tmp_path / "out").exists()
