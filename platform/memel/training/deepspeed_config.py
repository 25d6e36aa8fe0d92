"""The DeepSpeed config of a training run, generated from the spec (user keys win)."""

from __future__ import annotations

from typing import Any

from .spec import TrainSpec


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def deepspeed_config(spec: TrainSpec) -> dict[str, Any]:
    """ZeRO stage, batch sizes, clipping and precision from the spec, merged with ``train.deepspeed``.

    The optimizer is a torch AdamW passed to ``deepspeed.initialize`` (ZeRO shards its state
    like any client optimizer), so no DeepSpeed op has to be compiled for it. DeepSpeed's own
    throughput timer is off: memel times its steps itself, and the timer waits for the device
    at every micro-batch's start and end. On CPU (gloo), ZeRO-2 all-reduces each gradient bucket
    whole and keeps its own partition (``reduce_scatter: false``): the same weights as DeepSpeed's
    per-partition reduction, in a shorter step there (docs/benchmarks.md).
    """
    train = spec.train
    config: dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.accumulation,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False}},
    }
    if train.zero_stage == 2 and not train.use_gpu:
        config["zero_optimization"]["reduce_scatter"] = False
    if train.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif train.precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return _merge(config, train.deepspeed)
