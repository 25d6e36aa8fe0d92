"""The named models (the ladder) and their inhibition presets, without torch.

``get_config(name)`` is a model's validated config, ``preset_targets(name, preset)`` the
module-name patterns of a preset; :mod:`memel.models.registry` builds the models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memel.errors import ConfigError

from .config import ModelConfig
from .family_configs import CNNConfig, ConvGRUConfig, DecoderConfig, EncoderConfig, ViTConfig

if TYPE_CHECKING:
    from torch import nn

#: Each family's config type.
CONFIG_TYPES: dict[str, type[ModelConfig]] = {
    "decoder": DecoderConfig,
    "encoder": EncoderConfig,
    "vit": ViTConfig,
    "cnn": CNNConfig,
    "convgru": ConvGRUConfig,
}


def _pythia(n_layers: int, d_model: int, n_heads: int, vocab_size: int = 50304) -> tuple[str, dict[str, Any]]:
    # The published 6.9b and 12b checkpoints pad the 50,277-token vocabulary to 50,432 and 50,688 rows.
    return "decoder", {
        "n_layers": n_layers,
        "d_model": d_model,
        "n_heads": n_heads,
        "vocab_size": vocab_size,
        "context_length": 2048,
    }


def _byte_lm(n_layers: int, d_model: int, n_heads: int) -> tuple[str, dict[str, Any]]:
    return "decoder", {
        "n_layers": n_layers,
        "d_model": d_model,
        "n_heads": n_heads,
        "vocab_size": 256,
        "context_length": 256,
    }


def _bert(n_layers: int, d_model: int, n_heads: int, byte: bool = False) -> tuple[str, dict[str, Any]]:
    vocab = {"vocab_size": 256, "max_positions": 256} if byte else {"vocab_size": 30522, "max_positions": 512}
    return "encoder", dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, **vocab)


def _vit(n_layers: int, d_model: int, n_heads: int) -> tuple[str, dict[str, Any]]:
    return "vit", {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads}


#: Every named model: family and config fields (the rest are the family's defaults).
LADDER: dict[str, tuple[str, dict[str, Any]]] = {
    "pythia-14m": _pythia(6, 128, 4),
    "pythia-31m": _pythia(6, 256, 8),
    "pythia-70m": _pythia(6, 512, 8),
    "pythia-160m": _pythia(12, 768, 12),
    "pythia-410m": _pythia(24, 1024, 16),
    "pythia-1b": _pythia(16, 2048, 8),
    "pythia-1.4b": _pythia(24, 2048, 16),
    "pythia-2.8b": _pythia(32, 2560, 32),
    "pythia-6.9b": _pythia(32, 4096, 32, vocab_size=50432),
    "pythia-12b": _pythia(36, 5120, 40, vocab_size=50688),
    "byte-0.2m": _byte_lm(4, 64, 4),
    "byte-1m": _byte_lm(5, 128, 4),
    "byte-4m": _byte_lm(5, 256, 8),
    # A width ladder at fixed depth (2 layers, d_ff = 4 x d_model) for the probing ablation (jobs/paper/figure2*.yaml).
    "byte-2l-d16": _byte_lm(2, 16, 2),
    "byte-2l-d32": _byte_lm(2, 32, 2),
    "byte-2l-d64": _byte_lm(2, 64, 4),
    "byte-2l-d128": _byte_lm(2, 128, 4),
    "byte-2l-d256": _byte_lm(2, 256, 8),
    "byte-2l-d512": _byte_lm(2, 512, 8),
    "bert-byte-tiny": _bert(2, 128, 2, byte=True),
    "bert-byte-mini": _bert(4, 256, 4, byte=True),
    "bert-tiny": _bert(2, 128, 2),
    "bert-mini": _bert(4, 256, 4),
    "bert-small": _bert(4, 512, 8),
    "bert-medium": _bert(8, 512, 8),
    "bert-base": _bert(12, 768, 12),
    "vit-micro": _vit(4, 64, 4),
    "vit-tiny": _vit(12, 192, 3),
    "vit-small": _vit(12, 384, 6),
    "vit-base": _vit(12, 768, 12),
    "cnn-tiny": ("cnn", {"widths": (16, 32)}),
    "cnn-small": ("cnn", {"widths": (32, 64, 128)}),
    "cnn-base": ("cnn", {"widths": (64, 128, 256, 512)}),
    "convgru": ("convgru", {}),
    "convgru-hko7": ("convgru", {"stem_channels": 8, "hidden_channels": (64, 192, 192), "strides": (5, 3, 2)}),
}


def _entry(name: str) -> tuple[type[ModelConfig], dict[str, Any]]:
    if name not in LADDER:
        raise ConfigError(f"model: unknown name {name!r}; known models: {', '.join(LADDER)}")
    family, fields = LADDER[name]
    return CONFIG_TYPES[family], fields


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The validated config of model ``name`` with ``overrides`` (unknown fields are rejected)."""
    config_type, fields = _entry(name)
    return config_type(**{**fields, **overrides})


def presets(name_or_model: str | nn.Module | ModelConfig) -> dict[str, list[str]]:
    """Inhibition target presets (fnmatch patterns on module names) of a model name, model or config."""
    if isinstance(name_or_model, str):
        config = get_config(name_or_model)
    elif isinstance(name_or_model, ModelConfig):
        config = name_or_model
    else:
        config = getattr(name_or_model, "config", None)
        if not isinstance(config, ModelConfig):
            raise ConfigError(
                f"name_or_model: {type(name_or_model).__name__} has no memel model config; "
                "allowed: a registry name, a memel model or a ModelConfig"
            )
    return config.presets()


def preset_targets(name_or_model: str | nn.Module | ModelConfig, preset: str) -> list[str]:
    """The fnmatch patterns of ``preset`` for a model name, model or config."""
    found = presets(name_or_model)
    if preset not in found:
        raise ConfigError(f"preset: unknown preset {preset!r}; allowed for this model: {', '.join(found)}")
    return list(found[preset])
