"""What runs beside the training loop: tracking, statistics, pruning, progress, fault injection, step timing."""

from .base import Callback, CallbackList
from .console import ConsoleProgress, say
from .fault import FAULT_MARKER_ENV, FAULT_STEP_ENV, FaultInjector
from .pruning import PruningCallback
from .timing import STEP_TIMES_ENV, StepTimer
from .tracking import TrackerCallback, module_metrics

__all__ = [
    "FAULT_MARKER_ENV",
    "FAULT_STEP_ENV",
    "STEP_TIMES_ENV",
    "Callback",
    "CallbackList",
    "ConsoleProgress",
    "FaultInjector",
    "PruningCallback",
    "StepTimer",
    "TrackerCallback",
    "module_metrics",
    "say",
]
