"""The run's progress as one line per log on stdout (rank 0):
``[memel] step 10/30 loss 2.3456 12,345 tokens/s eta 20s``.

The line is written to ``sys.stdout`` directly, not with ``print``: inside a Ray Train worker
``print`` is patched to also log through the root logger, and Ray forwards both the logger's
console output and the worker's stdout to the driver, which showed every line twice.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TextIO

from .base import Callback


def say(line: str, stream: TextIO | None = None) -> None:
    """One ``[memel]`` line on ``stream`` (default stdout), flushed at once."""
    stream = stream or sys.stdout
    stream.write(f"[memel] {line}\n")
    stream.flush()


class ConsoleProgress(Callback):
    """Prints step, loss, throughput and the estimated time left at every log."""

    def __init__(self, steps: int, unit: str, stream: TextIO | None = None) -> None:
        self.steps, self.unit, self.stream = steps, unit, stream

    def on_log(self, step: int, metrics: Mapping[str, float]) -> None:
        remaining = (self.steps - step) * metrics["train/step_time_s"]
        say(
            f"step {step}/{self.steps} loss {metrics['train/loss']:.4f} "
            f"{metrics['train/items_per_s']:,.0f} {self.unit}/s eta {remaining:,.0f}s",
            self.stream,
        )
