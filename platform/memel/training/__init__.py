"""One training run: Ray Train workers, DeepSpeed ZeRO, inhibition, MLflow and Parquet outputs.

Names load their module on first access: ``load_spec`` imports without torch, Ray or
DeepSpeed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memel.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("TrainResult", "check_address_outputs", "init_ray", "run_training"), ".runner"),
    **dict.fromkeys(("TrainSpec", "load_spec"), ".spec"),
}
__all__ = ["TrainResult", "TrainSpec", "check_address_outputs", "init_ray", "load_spec", "run_training"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .runner import TrainResult, check_address_outputs, init_ray, run_training
    from .spec import TrainSpec, load_spec
