"""Fine-tuning from a pretrained checkpoint: ``model.init_from`` resolved and its weights loaded.

``model.init_from`` names one of:

- a checkpoint folder (a DeepSpeed tag folder beside ``memel/progress.json``, as Ray Train keeps it);
- a finished run's output folder, or a sweep member's folder (``runs/<job>/members/<key>``):
  its ``summary.json`` names its last checkpoint.

Only the model weights are taken: the optimizer, the learning-rate schedule, the data position,
the step count and the Inhibitors' statistics start fresh.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from memel import run_record
from memel.errors import ConfigError

FIELD = "model.init_from"


def resolve_init_from(value: str) -> Path:
    """The checkpoint folder ``value`` names; ConfigError naming the field when it names none."""
    path = Path(value).expanduser()
    if not path.exists():
        raise ConfigError(
            f"{FIELD}: no such path {value!r}; give a finished run's output folder (with summary.json), "
            "a sweep member's folder (runs/<job>/members/<key>) or a checkpoint folder"
        )
    if run_record.progress_path(path).is_file():
        return path
    summary = path / run_record.SUMMARY_FILE
    if summary.is_file():
        try:
            checkpoint = json.loads(summary.read_text()).get("checkpoint")
        except ValueError:
            checkpoint = None
        if not checkpoint:
            raise ConfigError(f"{FIELD}: {summary} names no checkpoint; did the run finish? (rerun it, then fine-tune)")
        found = Path(checkpoint)
        if not run_record.progress_path(found).is_file():
            raise ConfigError(
                f"{FIELD}: the checkpoint {checkpoint} named by {summary} is not a local checkpoint folder"
            )
        return found
    if (path / run_record.SWEEP_FILE).is_file():
        members = sorted(p.name for p in (path / "members").glob("*"))
        example = path / "members" / (members[0] if members else "<key>")
        raise ConfigError(f"{FIELD}: {value!r} is a sweep folder; name one of its members, e.g. {example}")
    raise ConfigError(
        f"{FIELD}: {value!r} is not a checkpoint (no memel/progress.json) nor a finished run's folder (no summary.json)"
    )


def load_init_weights(model: torch.nn.Module, value: str) -> int:
    """Load the weights of checkpoint ``value`` into ``model`` (before Inhibitors are inserted);
    returns the checkpoint's step. Refuses weights that do not fit the model."""
    from .checkpoint_weights import load_host_weights

    checkpoint = resolve_init_from(value)
    progress = load_host_weights(
        model,
        checkpoint,
        f"{FIELD}: the weights of {checkpoint} do not fit this model",
        "; fine-tune the same model.name and model.overrides as the pretrained run",
    )
    return int(progress["step"])
