"""memel: study and induce emergence by inhibiting monosemantic neurons (arXiv 2312.11560)."""

from .inhibition import (
    ConfigError,
    InhibitionConfig,
    Inhibitor,
    Snapshot,
    auxiliary_loss,
    inhibit,
    inhibitors,
    remove,
    snapshot,
    sync,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "InhibitionConfig",
    "Inhibitor",
    "Snapshot",
    "__version__",
    "auxiliary_loss",
    "inhibit",
    "inhibitors",
    "remove",
    "snapshot",
    "sync",
]
