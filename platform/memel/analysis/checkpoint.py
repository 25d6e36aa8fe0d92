"""Rebuild a trained sweep member from its last checkpoint: full fp32 weights, its Inhibitors and
its optimizer (AdamW moments per parameter, step count and last learning rate)."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import memel
from memel import run_record
from memel.errors import ConfigError
from memel.training.checkpoint_weights import load_host_weights

from .source import Member, read_spec


@dataclass
class Trained:
    """A trained model (eval mode) with its spec, the inhibition targets and the checkpoint's Inhibitor states."""

    model: torch.nn.Module
    spec: Any  # memel.training.TrainSpec
    targets: list[str]
    inhibition: dict[str, dict[str, torch.Tensor]]
    step: int
    checkpoint: Path | None = None
    tag: str | None = None

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
    spec = read_spec(member.spec)
    model = build(spec.model.name, **spec.model.overrides)
    progress = load_host_weights(
        model, checkpoint, f"member {member.label}: checkpoint weights do not fit {spec.model.name}"
    )
    model.eval()
    targets = list(spec.model.targets or preset_targets(spec.model.name, spec.model.preset or "mlp"))
    inhibition_file = run_record.inhibition_path(checkpoint)
    inhibition = torch.load(inhibition_file, map_location="cpu", weights_only=False) if inhibition_file.exists() else {}
    return Trained(model, spec, targets, inhibition, int(progress["step"]), checkpoint, progress["tag"])


@contextlib.contextmanager
def _quiet_deepspeed() -> Any:
    quiet = logging.getLogger("DeepSpeed")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:  # DeepSpeed's checkpoint readers print their progress: keep the terminal for the summary
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        quiet.setLevel(level)


def _adamw_hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {
        "lr": float(group["lr"]),
        "betas": tuple(float(b) for b in group.get("betas", (0.9, 0.999))),
        "eps": float(group.get("eps", 1e-8)),
        "weight_decay": float(group.get("weight_decay", 0.0)),
    }


def optimizer_state(checkpoint: Path, tag: str, parameter_names: list[str], grad_clip: float = 0.0) -> Any:
    """The run's AdamW at ``checkpoint``/``tag`` as an :class:`~memel.analysis.case_study.OptimizerState`:
    its last learning rate, hyperparameters, and step count and moments per parameter name.

    ZeRO 1-2 shards are merged the way DeepSpeed merges the fp32 weights (the moments of a flat
    partition are laid out like its weights); a ZeRO-0 checkpoint holds the torch optimizer's
    state, indexed in ``parameter_names`` order (the model's ``named_parameters``)."""
    from .case_study import OptimizerState

    tag_dir = checkpoint / tag
    shards = sorted(
        tag_dir.glob("*optim_states.pt"),
        key=lambda f: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", f.name)],
    )
    if shards:
        with _quiet_deepspeed():
            from deepspeed.utils import zero_to_fp32 as z

            loaded = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in shards]
            stage = int(loaded[0]["zero_stage"])
            if stage > 2:
                raise ConfigError(
                    f"checkpoint: {tag_dir} is ZeRO-{stage}; the case study reads the optimizer of ZeRO 0-2 runs"
                )
            base = [shard["base_optimizer_state"] for shard in loaded]
            groups = base[0]["param_groups"]
            model_states = z.parse_model_states(z.get_model_state_files(str(tag_dir)))
            merged: dict[str, dict[str, torch.Tensor]] = {}
            for key in ("exp_avg", "exp_avg_sq"):
                flat = [[shard["state"][g][key] for g in range(len(groups))] for shard in base]
                out: dict[str, torch.Tensor] = {}
                z._zero2_merge_trainable_params(
                    out, len(shards), flat, model_states, loaded[0].get("param_alignment_paddings")
                )
                for name, tensor in out.items():
                    merged.setdefault(name, {})[key] = tensor.float().clone()
            steps = [base[0]["state"][g]["step"] for g in range(len(groups))]
            names_by_group = [list(shapes) for shapes in model_states[0].param_shapes]
            for g, names in enumerate(names_by_group):
                for name in names:
                    merged[name]["step"] = torch.as_tensor(steps[g], dtype=torch.float32).clone()
            hyper = _adamw_hyper(groups[0])
    else:
        states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not states:
            raise ConfigError(f"checkpoint: {tag_dir} holds neither ZeRO shards nor mp_rank_*_model_states.pt")
        saved = torch.load(states[0], map_location="cpu", weights_only=False).get("optimizer")
        if not saved or not saved.get("state"):
            raise ConfigError(f"checkpoint: {states[0]} holds no optimizer state")
        merged = {}
        groups = saved["param_groups"]
        for group in groups:
            for index in group["params"]:
                if index in saved["state"]:
                    merged[parameter_names[index]] = {k: v.clone() for k, v in saved["state"][index].items()}
        hyper = _adamw_hyper(groups[0])
    missing = sorted(set(parameter_names) - set(merged))
    if missing:
        raise ConfigError(f"checkpoint: the optimizer state has no moments for {missing[:5]}")
    return OptimizerState(kind="adamw", grad_clip=grad_clip, state=merged, **hyper)


def member_optimizer(trained: Trained) -> Any:
    """:func:`optimizer_state` of a loaded member (its last checkpoint), with the run's gradient clipping."""
    if trained.checkpoint is None or trained.tag is None:
        raise ConfigError("the member's checkpoint folder is unknown; load it with load_member")
    names = [name for name, _ in trained.model.named_parameters()]
    return optimizer_state(trained.checkpoint, trained.tag, names, trained.spec.train.grad_clip)
