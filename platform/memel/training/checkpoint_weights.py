"""Full fp32 host-model weights out of a memel checkpoint (DeepSpeed ZeRO shards or ZeRO-0
module states), for fine-tuning (``model.init_from``) and offline analysis."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from memel import run_record
from memel.errors import ConfigError


def fp32_weights(checkpoint: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights from a DeepSpeed checkpoint (ZeRO 1-3 shards, or ZeRO-0's module states)."""
    tag_dir = checkpoint / tag
    if not tag_dir.is_dir():
        raise ConfigError(f"checkpoint: {checkpoint} has no DeepSpeed tag folder {tag!r}")
    if any(tag_dir.glob("*optim_states.pt")) and any(tag_dir.glob("zero_pp_rank_*")):
        quiet = logging.getLogger("DeepSpeed")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:  # zero_to_fp32 prints its progress (and a tqdm bar): keep the terminal for the summary
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                from deepspeed.utils.zero_to_fp32 import (
                    get_fp32_state_dict_from_zero_checkpoint,
                )

                return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag))
        finally:
            quiet.setLevel(level)
    states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not states:
        raise ConfigError(f"checkpoint: {tag_dir} holds neither ZeRO shards nor mp_rank_*_model_states.pt")
    saved = torch.load(states[0], map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}


def load_host_weights(model: torch.nn.Module, checkpoint: Path, misfit: str, fix: str = "") -> dict[str, Any]:
    """Load the host model's fp32 weights of a memel checkpoint folder into ``model`` (Inhibitor
    buffers left out); returns the checkpoint's ``memel/progress.json``. Weights that do not fit
    raise ``ConfigError(misfit + what is missing or unexpected + fix)``."""
    progress = json.loads(run_record.progress_path(checkpoint).read_text())
    weights = {k: v for k, v in fp32_weights(checkpoint, progress["tag"]).items() if ".inhibitor." not in k}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    parameters = {name for name, _ in model.named_parameters()}
    if unexpected or parameters.intersection(missing):
        raise ConfigError(
            f"{misfit} (missing {sorted(parameters.intersection(missing))[:5]}, unexpected {sorted(unexpected)[:5]}){fix}"
        )
    return progress
