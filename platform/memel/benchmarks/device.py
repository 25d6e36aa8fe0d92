"""The device a benchmark runs on, checked at the edge, and the wait that makes its clock honest."""

from __future__ import annotations

import torch

from memel.errors import ConfigError


def bench_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a device that torch can use here; a :class:`ConfigError`
    naming ``device`` otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: got {name!r}; allowed: cpu, cuda, cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"device: got {name!r}; allowed: cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"device: got {name!r}, but torch sees no CUDA GPU here; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device: got {name!r}; this machine has {torch.cuda.device_count()} CUDA GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def synchronize(device: torch.device) -> None:
    """Wait until ``device`` has finished the work queued on it (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
