"""What a training run minimises and reports, by data kind (every batch is (inputs, targets))."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass
class StepOutput:
    loss: torch.Tensor
    #: items the loss averages over (tokens for LMs, examples otherwise) and how many were right
    #: (a 0-dim tensor on the batch's device: read only by those who need it, as evaluation).
    items: int
    correct: torch.Tensor | None = None


def compute(model: Any, batch: Any, kind: str, device: torch.device) -> StepOutput:
    """Forward one batch and return the mean loss with its item count."""
    inputs, targets = batch.inputs.to(device), batch.targets.to(device)
    if kind == "text_lm":
        logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return StepOutput(loss, targets.numel())
    if kind == "nowcast":
        prediction = model(inputs, targets.shape[1])
        return StepOutput(F.mse_loss(prediction.float(), targets.float()), targets.shape[0])
    logits = model(inputs)
    loss = F.cross_entropy(logits.float(), targets)
    correct = (logits.detach().argmax(-1) == targets).sum()
    return StepOutput(loss, targets.shape[0], correct)
