"""Offline data: sharded, seeded, resumable batch loaders and their typed configs.

``memel.data.build(config_or_dict, rank, world_size)`` returns an iterator of batches
(named tuples of torch tensors) with ``state_dict()`` / ``load_state_dict()``.
Kinds: ``text_lm``, ``text_classification``, ``glue``, ``digits``, ``image_folder``,
``nowcast``, ``sparse_features``, ``planted_text``.

Names load their module on first access: ``parse`` (what a job spec validates with)
imports without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memel.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(
        (
            "CONFIGS",
            "DataConfig",
            "DigitsConfig",
            "GlueConfig",
            "ImageFolderConfig",
            "NowcastConfig",
            "PlantedTextConfig",
            "SparseFeaturesConfig",
            "TextClassificationConfig",
            "TextLMConfig",
            "build",
            "parse",
        ),
        ".configs",
    ),
    "DataError": ".errors",
    "FixedBatches": ".fixed_batches",
    "GlueLoader": ".glue",
    "ImageFolderLoader": ".images",
    "ShardedLoader": ".loader",
    **dict.fromkeys(("NowcastBatch", "NowcastLoader", "rain_to_pixel"), ".nowcast"),
    **dict.fromkeys(("PlantedBatch", "PlantedTextLoader", "SparseFeatureLoader"), ".planted"),
    **dict.fromkeys(("ClassBatch", "PassageLoader"), ".text_classification"),
    **dict.fromkeys(("LMBatch", "TextLMLoader"), ".text_lm"),
}
__all__ = [
    "CONFIGS",
    "ClassBatch",
    "DataConfig",
    "DataError",
    "DigitsConfig",
    "FixedBatches",
    "GlueConfig",
    "GlueLoader",
    "ImageFolderConfig",
    "ImageFolderLoader",
    "LMBatch",
    "NowcastBatch",
    "NowcastConfig",
    "NowcastLoader",
    "PassageLoader",
    "PlantedBatch",
    "PlantedTextConfig",
    "PlantedTextLoader",
    "ShardedLoader",
    "SparseFeatureLoader",
    "SparseFeaturesConfig",
    "TextClassificationConfig",
    "TextLMConfig",
    "TextLMLoader",
    "build",
    "parse",
    "rain_to_pixel",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .configs import (
        CONFIGS,
        DataConfig,
        DigitsConfig,
        GlueConfig,
        ImageFolderConfig,
        NowcastConfig,
        PlantedTextConfig,
        SparseFeaturesConfig,
        TextClassificationConfig,
        TextLMConfig,
        build,
        parse,
    )
    from .errors import DataError
    from .fixed_batches import FixedBatches
    from .glue import GlueLoader
    from .images import ImageFolderLoader
    from .loader import ShardedLoader
    from .nowcast import NowcastBatch, NowcastLoader, rain_to_pixel
    from .planted import PlantedBatch, PlantedTextLoader, SparseFeatureLoader
    from .text_classification import ClassBatch, PassageLoader
    from .text_lm import LMBatch, TextLMLoader
