"""Plain-PyTorch model ladder: decoder LMs (Pythia layout), BERT encoders, ViT, CNN, ConvGRU.

``build(name, **overrides)`` builds a model by name, ``preset_targets(name_or_model, preset)``
gives the module-name patterns to pass to ``memel.inhibit``, ``list_models()`` the ladder
with exact parameter counts.
"""

from .cnn import CNNClassifier, CNNConfig
from .config import InputError, ModelConfig
from .convgru import ConvGRUCell, ConvGRUConfig, ConvGRUNowcaster
from .decoder import DecoderConfig, DecoderLM, causal_lm_loss
from .encoder import EncoderClassifier, EncoderConfig
from .nowcasting_metrics import (
    HKO7_ZR,
    MARSHALL_PALMER,
    b_mae,
    b_mse,
    balancing_weights,
)
from .registry import (
    FAMILIES,
    LADDER,
    ModelInfo,
    build,
    build_from_config,
    count_parameters,
    get_config,
    list_models,
    preset_targets,
    presets,
)
from .vit import ViTClassifier, ViTConfig

__all__ = [
    "FAMILIES",
    "HKO7_ZR",
    "LADDER",
    "MARSHALL_PALMER",
    "CNNClassifier",
    "CNNConfig",
    "ConvGRUCell",
    "ConvGRUConfig",
    "ConvGRUNowcaster",
    "DecoderConfig",
    "DecoderLM",
    "EncoderClassifier",
    "EncoderConfig",
    "InputError",
    "ModelConfig",
    "ModelInfo",
    "ViTClassifier",
    "ViTConfig",
    "b_mae",
    "b_mse",
    "balancing_weights",
    "build",
    "build_from_config",
    "causal_lm_loss",
    "count_parameters",
    "get_config",
    "list_models",
    "preset_targets",
    "presets",
]
