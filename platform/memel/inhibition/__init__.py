"""Monosemantic Scale statistics and Reverse Deactivation (the inhibition core; torch only)."""

from memel.errors import ConfigError

from .config import ExecutionConfig, InhibitionConfig
from .insertion import (
    auxiliary_loss,
    inhibit,
    inhibitors,
    match_targets,
    remove,
    snapshot,
    sync,
)
from .module import Inhibitor, Snapshot

__all__ = [
    "ConfigError",
    "ExecutionConfig",
    "InhibitionConfig",
    "Inhibitor",
    "Snapshot",
    "auxiliary_loss",
    "inhibit",
    "inhibitors",
    "match_targets",
    "remove",
    "snapshot",
    "sync",
]
