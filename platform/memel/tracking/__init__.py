"""Experiment tracking: MLflow (a server or a local store in the output folder) or the console."""

from .base import RunStatus, Tracker, flatten, is_secret_key
from .console import ConsoleTracker
from .mlflow_tracker import (
    MlflowTracker,
    check_tracking_uri,
    default_tracking_uri,
)
from .resumed_run import start_recorded_run

__all__ = [
    "ConsoleTracker",
    "MlflowTracker",
    "RunStatus",
    "Tracker",
    "check_tracking_uri",
    "default_tracking_uri",
    "flatten",
    "is_secret_key",
    "start_recorded_run",
]
