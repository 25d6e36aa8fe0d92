"""Small CNN classifier: stages of conv3x3 -> BatchNorm -> ReLU (-> max-pool), then a linear head.

Defaults fit sklearn digits (8x8, one channel, 10 classes). Every stage but the last halves
the image, so ``image_size`` must be divisible by ``2 ** (len(widths) - 1)``.
Inhibition targets: ``stages.{i}.act`` ([B, C, H, W]: use ``layout="element"`` for one
neuron per channel and position, ``channel`` treats the last (width) axis as neurons).
"""

from __future__ import annotations

import torch
from torch import nn

from .family_configs import CNNConfig
from .vit import check_images


class ConvStage(nn.Module):
    """conv3x3 -> BatchNorm (or identity) -> ReLU -> optional 2x2 max-pool."""

    def __init__(self, cin: int, cout: int, batch_norm: bool, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)
        self.norm = nn.BatchNorm2d(cout) if batch_norm else nn.Identity()
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.norm(self.conv(x))))


class CNNClassifier(nn.Module):
    """``forward(images [B, in_channels, image_size, image_size]) -> logits [B, num_classes]``."""

    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = config
        chans = (config.in_channels, *config.widths)
        last = len(config.widths) - 1
        self.stages = nn.ModuleList(
            ConvStage(chans[i], chans[i + 1], config.batch_norm, pool=i < last) for i in range(len(config.widths))
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(config.widths[-1], config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        factor = 2 ** (len(self.config.widths) - 1)
        check_images(
            images,
            self.config.in_channels,
            self.config.image_size,
            f"{len(self.config.widths)} stages, divisible by {factor}",
        )
        x = images
        for stage in self.stages:
            x = stage(x)
        return self.head(self.pool(x).flatten(1))
