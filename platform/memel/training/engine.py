"""What the training loop needs of an engine, and a plain-torch engine beside DeepSpeed's.

A DeepSpeed engine already has this interface (call it to forward; ``backward``; ``step``
after every micro-batch, stepping the optimizer at the accumulation boundary; ``get_lr``;
``module``). :class:`TorchEngine` gives a bare model and optimizer the same one, so the same
loop trains both (``memel demo`` uses it).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class Engine(Protocol):
    """A model with its optimizer, stepped per micro-batch."""

    module: torch.nn.Module

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def get_lr(self) -> list[float]: ...


class TorchEngine:
    """A torch optimizer (and optional LR scheduler) stepped every ``accumulation`` micro-batches;
    each micro-batch's loss is scaled by ``1 / accumulation`` as DeepSpeed does."""

    def __init__(
        self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None, accumulation: int = 1
    ) -> None:
        self.module, self.optimizer, self.scheduler, self.accumulation = module, optimizer, scheduler, accumulation
        self._micro_batches = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation if self.accumulation > 1 else loss).backward()

    def step(self) -> None:
        self._micro_batches += 1
        if self._micro_batches % self.accumulation:
            return
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_lr(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]
