"""Monosemantic Scale statistics and Reverse Deactivation (the inhibition core; torch only).

Names load their module on first access, so that :mod:`memel.inhibition.config` (what a job
spec validates against) imports without torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from memel.lazy import lazy_exports

_EXPORTS = {
    "ConfigError": "memel.errors",
    "ExecutionConfig": ".config",
    "InhibitionConfig": ".config",
    "Inhibitor": ".module",
    "Snapshot": ".module",
    **dict.fromkeys(
        ("auxiliary_loss", "inhibit", "inhibitors", "match_targets", "remove", "snapshot", "sync"), ".insertion"
    ),
}
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
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from memel.errors import ConfigError

    from .config import ExecutionConfig, InhibitionConfig
    from .insertion import auxiliary_loss, inhibit, inhibitors, match_targets, remove, snapshot, sync
    from .module import Inhibitor, Snapshot


class _Package(types.ModuleType):
    """``memel.inhibition.sync`` is the function: loading the submodule of the same name binds
    that submodule on the package, which this property ignores."""

    @property
    def sync(self) -> Any:
        return importlib.import_module(".insertion", __name__).sync

    @sync.setter
    def sync(self, _submodule: types.ModuleType) -> None:
        pass


sys.modules[__name__].__class__ = _Package
