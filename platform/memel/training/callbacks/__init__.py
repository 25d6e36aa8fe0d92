"""What runs beside the training loop: tracking, statistics, pruning, progress, fault injection."""

from .base import Callback, CallbackList
from .console import ConsoleProgress, say
from .fault import FAULT_MARKER_ENV, FAULT_STEP_ENV, FaultInjector
from .pruning import PruningCallback
from .tracking import TrackerCallback, module_metrics

__all__ = [
    "FAULT_MARKER_ENV",
    "FAULT_STEP_ENV",
    "Callback",
    "CallbackList",
    "ConsoleProgress",
    "FaultInjector",
    "PruningCallback",
    "TrackerCallback",
    "module_metrics",
    "say",
]
