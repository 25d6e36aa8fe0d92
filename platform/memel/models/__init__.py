"""Plain-PyTorch model ladder: decoder LMs (Pythia layout), BERT encoders, ViT, CNN, ConvGRU.

``build(name, **overrides)`` builds a model by name, ``preset_targets(name_or_model, preset)``
gives the module-name patterns to pass to ``memel.inhibit``, ``list_models()`` the ladder
with exact parameter counts.

Names load their module on first access: the configs and the ladder (``get_config``,
``preset_targets``) import without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memel.lazy import lazy_exports

_EXPORTS = {
    "CNNClassifier": ".cnn",
    **dict.fromkeys(("CNNConfig", "ConvGRUConfig", "DecoderConfig", "EncoderConfig", "ViTConfig"), ".family_configs"),
    **dict.fromkeys(("InputError", "ModelConfig"), ".config"),
    **dict.fromkeys(("ConvGRUCell", "ConvGRUNowcaster"), ".convgru"),
    **dict.fromkeys(("DecoderLM", "causal_lm_loss"), ".decoder"),
    "EncoderClassifier": ".encoder",
    **dict.fromkeys(("HKO7_ZR", "MARSHALL_PALMER", "b_mae", "b_mse", "balancing_weights"), ".nowcasting_metrics"),
    **dict.fromkeys(
        ("FAMILIES", "ModelInfo", "build", "build_from_config", "count_parameters", "list_models"), ".registry"
    ),
    **dict.fromkeys(("LADDER", "get_config", "preset_targets", "presets"), ".ladder"),
    "ViTClassifier": ".vit",
}
__all__ = [
    "CNNClassifier",
    "CNNConfig",
    "ConvGRUCell",
    "ConvGRUConfig",
    "ConvGRUNowcaster",
    "DecoderConfig",
    "DecoderLM",
    "EncoderClassifier",
    "EncoderConfig",
    "FAMILIES",
    "HKO7_ZR",
    "InputError",
    "LADDER",
    "MARSHALL_PALMER",
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
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .cnn import CNNClassifier
    from .config import InputError, ModelConfig
    from .convgru import ConvGRUCell, ConvGRUNowcaster
    from .decoder import DecoderLM, causal_lm_loss
    from .encoder import EncoderClassifier
    from .family_configs import CNNConfig, ConvGRUConfig, DecoderConfig, EncoderConfig, ViTConfig
    from .ladder import LADDER, get_config, preset_targets, presets
    from .nowcasting_metrics import HKO7_ZR, MARSHALL_PALMER, b_mae, b_mse, balancing_weights
    from .registry import FAMILIES, ModelInfo, build, build_from_config, count_parameters, list_models
    from .vit import ViTClassifier
