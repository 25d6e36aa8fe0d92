"""memel: study and induce emergence by inhibiting monosemantic neurons (arXiv 2312.11560).

The library API (``memel.inhibit``, ``memel.snapshot``, ...) loads torch on first use, so that
the command line starts without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memel.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "ConfigError": "memel.errors",
    "InhibitionConfig": "memel.inhibition.config",
    "Inhibitor": "memel.inhibition.module",
    "Snapshot": "memel.inhibition.module",
    **dict.fromkeys(
        ("auxiliary_loss", "inhibit", "inhibitors", "remove", "snapshot", "sync"), "memel.inhibition.insertion"
    ),
}
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
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from memel.errors import ConfigError
    from memel.inhibition.config import InhibitionConfig
    from memel.inhibition.insertion import auxiliary_loss, inhibit, inhibitors, remove, snapshot, sync
    from memel.inhibition.module import Inhibitor, Snapshot
