"""One training run: Ray Train workers, DeepSpeed ZeRO, inhibition, MLflow and Parquet outputs."""

from .runner import TrainResult, check_address_outputs, init_ray, run_training
from .spec import TrainSpec, load_spec

__all__ = ["TrainResult", "TrainSpec", "check_address_outputs", "init_ray", "load_spec", "run_training"]
