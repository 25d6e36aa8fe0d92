"""Held-out batches with the feature groups of every sample, and per-sample losses.

Groups come from what the data knows about each sample: the source corpus of an LM window
(``shakespeare``, ``shakespeare-folio``, ``python-code``), the class of a passage
(``prose``/``code``, a source, an edition, a work), each active planted feature of
``sparse_features``. Every sample is also in the group ``all``; data without features
(images, radar echoes, GLUE, text from ``paths``) has that group only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ALL = "all"


def heldout_loader(data: dict[str, Any], batch_size: int, seed: int = 0) -> Any:
    """The held-out split of ``data`` on one process, in order."""
    from memel.data import build

    return build({**data, "batch_size": batch_size, "seed": seed, "split": "heldout", "shuffle": False, "epochs": 1})


def _window_labels(loader: Any, indices: np.ndarray) -> list[str]:
    """The corpus label of the document each LM window starts in (a separator: the next document)."""
    from memel.data.documents import Document

    stream = loader.stream
    labels = []
    for index in indices:
        segment = int(np.searchsorted(stream.starts, int(index) * loader.seq_len, side="right")) - 1
        while segment < len(stream.segments) and not isinstance(stream.segments[segment], Document):
            segment += 1
        labels.append(stream.segments[segment].label if segment < len(stream.segments) else "")
    return labels


def sample_groups(loader: Any, indices: np.ndarray, batch: Any) -> list[list[str]]:
    """The feature groups of every sample of ``batch`` (made of example ``indices``), ``all`` included."""
    from memel.data import PassageLoader, SparseFeatureLoader, TextLMLoader

    if isinstance(loader, TextLMLoader):
        found = [[label] if label else [] for label in _window_labels(loader, indices)]
    elif isinstance(loader, PassageLoader):
        found = [[loader.class_names[int(loader.labels[int(i)])]] for i in indices]
    elif isinstance(loader, SparseFeatureLoader):
        active = batch.features.numpy().astype(bool)
        found = [[f"feature {k}" for k in np.flatnonzero(row)] for row in active]
    else:
        found = [[] for _ in indices]
    return [[ALL, *groups] for groups in found]


def grouped_batches(
    data: dict[str, Any], batch_size: int, max_batches: int, seed: int = 0
) -> Iterator[tuple[Any, list[list[str]]]]:
    """Up to ``max_batches`` held-out batches, each with every sample's groups."""
    loader = heldout_loader(data, batch_size, seed)
    order = loader.indices(0)
    for start in range(0, min(len(order), max_batches * batch_size), batch_size):
        chunk = order[start : start + batch_size]
        if len(chunk) < batch_size and start:
            break
        batch = loader.fetch(chunk)
        yield batch, sample_groups(loader, chunk, batch)


def sample_losses(model: Any, batch: Any, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: summed loss and the items it sums over, such that sum(loss) / sum(items)
    equals the training objective's mean loss (:func:`memel.training.objective.compute`)."""
    inputs, targets = batch.inputs, batch.targets
    if kind == "text_lm":
        logits = model(inputs)
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        return losses.double().sum(1), torch.full((targets.shape[0],), float(targets.shape[1]), dtype=torch.float64)
    if kind == "nowcast":
        prediction = model(inputs, targets.shape[1])
        losses = (prediction.float() - targets.float()).square().flatten(1).double().mean(1)
        return losses, torch.ones(targets.shape[0], dtype=torch.float64)
    logits = model(inputs)
    losses = F.cross_entropy(logits.float(), targets, reduction="none").double()
    return losses, torch.ones(targets.shape[0], dtype=torch.float64)
