"""Building the ladder's models by name: ``build``, ``count_parameters``, ``list_models``.

The ladder itself and its presets (torch-free) are in :mod:`memel.models.ladder`, re-exported here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import nn

from memel.errors import ConfigError

from .cnn import CNNClassifier, CNNConfig
from .config import ModelConfig
from .convgru import ConvGRUConfig, ConvGRUNowcaster
from .decoder import DecoderConfig, DecoderLM
from .encoder import EncoderClassifier, EncoderConfig
from .ladder import LADDER, get_config, preset_targets, presets
from .vit import ViTClassifier, ViTConfig

__all__ = [
    "FAMILIES",
    "LADDER",
    "Family",
    "ModelInfo",
    "build",
    "build_from_config",
    "count_parameters",
    "get_config",
    "list_models",
    "preset_targets",
    "presets",
]


@dataclass(frozen=True)
class Family:
    """A model family: its config type and the module it builds."""

    name: str
    config_type: type[ModelConfig]
    model_type: type[nn.Module]


FAMILIES: dict[str, Family] = {
    "decoder": Family("decoder", DecoderConfig, DecoderLM),
    "encoder": Family("encoder", EncoderConfig, EncoderClassifier),
    "vit": Family("vit", ViTConfig, ViTClassifier),
    "cnn": Family("cnn", CNNConfig, CNNClassifier),
    "convgru": Family("convgru", ConvGRUConfig, ConvGRUNowcaster),
}


@dataclass(frozen=True)
class ModelInfo:
    """One row of ``list_models()``."""

    name: str
    family: str
    parameters: int
    presets: tuple[str, ...]


def build(name: str, *, device: torch.device | str | None = None, **overrides: Any) -> nn.Module:
    """Build model ``name`` (e.g. ``"pythia-70m"``, ``"byte-1m"``, ``"vit-tiny"``) with config overrides.

    ``device="meta"`` builds without allocating memory (for shapes and parameter counts).
    """
    return build_from_config(get_config(name, **overrides), device=device)


def build_from_config(config: ModelConfig, *, device: torch.device | str | None = None) -> nn.Module:
    """Build the model a family config describes."""
    for family in FAMILIES.values():
        if type(config) is family.config_type:
            with torch.device(device) if device is not None else contextlib.nullcontext():
                return family.model_type(config)
    raise ConfigError(
        f"config: {type(config).__name__} is not a model config; allowed: {', '.join(f.config_type.__name__ for f in FAMILIES.values())}"
    )


def count_parameters(name: str, **overrides: Any) -> int:
    """Exact parameter count of ``name``, built on the meta device (nothing is allocated)."""
    return _count(name, tuple(sorted(overrides.items())))


@cache
def _count(name: str, overrides: tuple[tuple[str, Any], ...]) -> int:
    model = build(name, device="meta", **dict(overrides))
    return sum(p.numel() for p in model.parameters())


def list_models(family: str | None = None) -> list[ModelInfo]:
    """Every named model (optionally of one family) with its exact parameter count and presets."""
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"family: unknown family {family!r}; allowed: {', '.join(FAMILIES)}")
    rows = []
    for name, (fam, _) in LADDER.items():
        if family is None or fam == family:
            rows.append(ModelInfo(name, fam, count_parameters(name), tuple(presets(name))))
    return rows
