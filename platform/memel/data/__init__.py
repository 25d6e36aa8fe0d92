"""Offline data: sharded, seeded, resumable batch loaders and their typed configs.

``memel.data.build(config_or_dict, rank, world_size)`` returns an iterator of batches
(named tuples of torch tensors) with ``state_dict()`` / ``load_state_dict()``.
Kinds: ``text_lm``, ``text_classification``, ``glue``, ``digits``, ``image_folder``,
``nowcast``, ``sparse_features``, ``planted_text``.
"""

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
from .glue import GlueLoader
from .images import ImageFolderLoader
from .loader import ShardedLoader
from .nowcast import NowcastBatch, NowcastLoader, rain_to_pixel
from .planted import PlantedBatch, PlantedTextLoader, SparseFeatureLoader
from .text_classification import ClassBatch, PassageLoader
from .text_lm import LMBatch, TextLMLoader

__all__ = [
    "CONFIGS",
    "ClassBatch",
    "DataConfig",
    "DataError",
    "DigitsConfig",
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
