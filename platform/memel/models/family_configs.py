"""The model families' configurations (shapes, validation, inhibition presets), without torch.

Each family's module (``decoder``, ``encoder``, ``vit``, ``cnn``, ``convgru``) builds the model
its config here describes; a job spec validates against these without loading torch.
"""

from __future__ import annotations

import math

from pydantic import Field, field_validator, model_validator

from .config import PAPER_PRESET, ModelConfig, layer_presets, middle


class DecoderConfig(ModelConfig):
    """Shape of a decoder LM; ``d_ff`` defaults to ``4 * d_model``."""

    vocab_size: int = Field(50304, ge=1)
    context_length: int = Field(2048, ge=1)
    n_layers: int = Field(6, ge=1)
    d_model: int = Field(512, ge=1)
    n_heads: int = Field(8, ge=1)
    d_ff: int | None = Field(None, ge=1)
    rotary_pct: float = Field(0.25, ge=0.0, le=1.0)
    rotary_base: float = Field(10000.0, gt=0.0)
    layer_norm_eps: float = Field(1e-5, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> DecoderConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        if self.rotary_dims % 2:
            raise ValueError(
                f"rotary_pct={self.rotary_pct} gives {self.rotary_dims} rotary dims of head_dim={self.head_dim}; "
                "allowed: a fraction giving an even number of dims"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    def presets(self) -> dict[str, list[str]]:
        return layer_presets(self.n_layers, "layers", "mlp.act", "attention.dense")


class EncoderConfig(ModelConfig):
    """Shape of a BERT encoder classifier; ``type_vocab_size=0`` disables token types."""

    vocab_size: int = Field(30522, ge=1)
    max_positions: int = Field(512, ge=1)
    type_vocab_size: int = Field(2, ge=0)
    n_layers: int = Field(2, ge=1)
    d_model: int = Field(128, ge=1)
    n_heads: int = Field(2, ge=1)
    d_ff: int | None = Field(None, ge=1)
    num_labels: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    layer_norm_eps: float = Field(1e-12, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> EncoderConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        return self

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    def presets(self) -> dict[str, list[str]]:
        return layer_presets(self.n_layers, "layers", "mlp.act", "attention.dense")


class ViTConfig(ModelConfig):
    """Shape of a ViT classifier; ``image_size`` must be a multiple of ``patch_size``."""

    image_size: int = Field(8, ge=1)
    patch_size: int = Field(2, ge=1)
    in_channels: int = Field(1, ge=1)
    num_classes: int = Field(10, ge=1)
    n_layers: int = Field(12, ge=1)
    d_model: int = Field(192, ge=1)
    n_heads: int = Field(3, ge=1)
    mlp_ratio: float = Field(4.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    layer_norm_eps: float = Field(1e-6, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> ViTConfig:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}; "
                "allowed: image_size = k * patch_size"
            )
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        return self

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def presets(self) -> dict[str, list[str]]:
        found = layer_presets(self.n_layers, "blocks", "mlp.act", "attn.proj")
        found["mid_blocks"] = [f"blocks.{i}" for i in middle(self.n_layers, self.n_layers // 2)]
        return found


class CNNConfig(ModelConfig):
    """Shape of a CNN classifier; ``widths`` are the output channels of its stages."""

    image_size: int = Field(8, ge=1)
    in_channels: int = Field(1, ge=1)
    num_classes: int = Field(10, ge=1)
    widths: tuple[int, ...] = (32, 64, 128)
    batch_norm: bool = True

    @field_validator("widths")
    @classmethod
    def _widths(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(w < 1 for w in value):
            raise ValueError("allowed: a non-empty tuple of positive channel counts")
        return value

    @model_validator(mode="after")
    def _check(self) -> CNNConfig:
        factor = 2 ** (len(self.widths) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} must be divisible by {factor} "
                f"(2 ** (stages - 1) for {len(self.widths)} stages)"
            )
        return self

    def presets(self) -> dict[str, list[str]]:
        n = len(self.widths)
        return {
            "blocks": ["stages.*.act"],
            "mid_blocks": [f"stages.{i}.act" for i in middle(n, n // 2)],
        }


class ConvGRUConfig(ModelConfig):
    """Shape of the encoder-forecaster; 3 levels (index 0 = finest)."""

    in_frames: int = Field(5, ge=1)
    out_frames: int = Field(20, ge=1)
    stem_channels: int = Field(8, ge=1)
    hidden_channels: tuple[int, int, int] = (16, 32, 32)
    strides: tuple[int, int, int] = (2, 2, 2)
    kernel_size: int = Field(3, ge=1)
    output_activation: bool = True

    @field_validator("hidden_channels", "strides")
    @classmethod
    def _positive(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(v < 1 for v in value):
            raise ValueError("allowed: three positive integers")
        return value

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("allowed: an odd kernel size (keeps the spatial size)")
        return value

    @property
    def downsample(self) -> int:
        return math.prod(self.strides)

    def presets(self) -> dict[str, list[str]]:
        encoder = [f"encoder.cells.{i}" for i in range(3)]
        forecaster = [f"forecaster.cells.{i}" for i in range(3)]
        return {
            "hidden": encoder + forecaster,
            "encoder_hidden": encoder,
            "forecaster_hidden": forecaster,
            PAPER_PRESET: encoder + forecaster,  # the authors' insertion: after each of the 6 cells' hidden state
        }
