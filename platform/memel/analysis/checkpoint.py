"""Rebuild a trained sweep member from its last checkpoint: full fp32 weights and its Inhibitors."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import memel
from memel.errors import ConfigError

from .source import Member, read_spec


@dataclass
class Trained:
    """A trained model (eval mode) with its spec, the inhibition targets and the checkpoint's Inhibitor states."""

    model: torch.nn.Module
    spec: Any  # memel.training.TrainSpec
    targets: list[str]
    inhibition: dict[str, dict[str, torch.Tensor]]
    step: int

    @property
    def kind(self) -> str:
        return self.spec.data.get("kind", "text_lm")

    def insert(self, **config: Any) -> dict[str, memel.Inhibitor]:
        """Insert Inhibitors with the run's config (fields overridden by ``config``) and its trained statistics."""
        base = self.spec.inhibition or memel.InhibitionConfig()
        settings = {**base.model_dump(), "stats_update": "call", **config}
        inserted = memel.inhibit(self.model, self.targets, memel.InhibitionConfig(**settings))
        for name, module in inserted.items():
            if name in self.inhibition:
                module.load_state_dict(self.inhibition[name])
        return inserted


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
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                return dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag))
        finally:
            quiet.setLevel(level)
    states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not states:
        raise ConfigError(f"checkpoint: {tag_dir} holds neither ZeRO shards nor mp_rank_*_model_states.pt")
    saved = torch.load(states[0], map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}


def load_member(member: Member) -> Trained:
    """The member's model at its last checkpoint (eval mode, no Inhibitors inserted yet)."""
    from memel.models import build, preset_targets

    if member.spec is None:
        raise ConfigError(f"member {member.label}: its spec is unknown (no spec.json); cannot rebuild the model")
    if not member.checkpoint:
        raise ConfigError(f"member {member.label}: no checkpoint recorded (summary.json has none)")
    checkpoint = Path(member.checkpoint)
    if not checkpoint.is_dir():
        raise ConfigError(
            f"member {member.label}: checkpoint {checkpoint} is not a local folder (on another machine or in remote storage?)"
        )
    progress = json.loads((checkpoint / "memel" / "progress.json").read_text())
    spec = read_spec(member.spec)
    model = build(spec.model.name, **spec.model.overrides)
    weights = {k: v for k, v in fp32_weights(checkpoint, progress["tag"]).items() if ".inhibitor." not in k}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    parameters = {name for name, _ in model.named_parameters()}
    if unexpected or parameters.intersection(missing):
        raise ConfigError(
            f"member {member.label}: checkpoint weights do not fit {spec.model.name} "
            f"(missing {sorted(parameters.intersection(missing))[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.eval()
    targets = list(spec.model.targets or preset_targets(spec.model.name, spec.model.preset or "mlp"))
    inhibition_file = checkpoint / "memel" / "inhibition.pt"
    inhibition = torch.load(inhibition_file, map_location="cpu", weights_only=False) if inhibition_file.exists() else {}
    return Trained(model, spec, targets, inhibition, int(progress["step"]))
