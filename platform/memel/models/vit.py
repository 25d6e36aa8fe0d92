"""Small Vision Transformer: patch embedding, CLS token, learned positions, pre-LN blocks.

Defaults fit sklearn digits (8x8, one channel, 10 classes); ImageNet ViT-B/16 is
``vit-base`` with ``image_size=224, patch_size=16, in_channels=3, num_classes=1000``.
Inhibition targets: ``blocks.{i}`` (block output), ``blocks.{i}.mlp.act``, ``blocks.{i}.attn.proj``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import InputError
from .family_configs import ViTConfig


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected by a strided convolution: [B, C, H, W] -> [B, N, d]."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(config.in_channels, config.d_model, config.patch_size, stride=config.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class ViTAttention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        qkv = self.qkv(x).view(batch, seq, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=dropout)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, width))


class ViTMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN block: ``x + attn(norm1(x))`` then ``+ mlp(norm2(x))``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = ViTAttention(config)
        self.norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = ViTMLP(config.d_model, int(config.d_model * config.mlp_ratio))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class ViTClassifier(nn.Module):
    """``forward(images [B, in_channels, image_size, image_size]) -> logits [B, num_classes]``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.n_patches + 1, config.d_model))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.d_model, config.num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.config.in_channels, self.config.image_size, f"patch_size={self.config.patch_size}")
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def check_images(images: torch.Tensor, channels: int, size: int, extra: str) -> None:
    """Raise InputError unless ``images`` is [B, channels, size, size] floating point."""
    expected = f"[batch, {channels}, {size}, {size}]"
    if images.dim() != 4 or not images.is_floating_point():
        raise InputError(
            f"images: expected a float tensor of shape {expected}, got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[1] != channels:
        raise InputError(f"images: got {images.shape[1]} channels but the model has in_channels={channels}")
    if tuple(images.shape[2:]) != (size, size):
        raise InputError(
            f"images: size {tuple(images.shape[2:])} does not fit the model (image_size={size}, {extra}); "
            f"resize to {size}x{size} or build the model with image_size={images.shape[2]} (square images only)"
        )
