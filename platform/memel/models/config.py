"""Shared base for typed model configurations and the errors models raise."""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from memel.errors import ConfigError, describe_validation_error


class InputError(ValueError):
    """A model input has the wrong shape, dtype or length; the message names what is allowed."""


class ModelConfig(BaseModel):
    """Frozen, validated model configuration; unknown fields are rejected by name.

    Subclasses describe one model family. ``presets()`` returns the inhibition target
    presets of the configured model: fnmatch patterns over ``model.named_modules()`` names.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise ConfigError(describe_validation_error(type(self).__name__, error, type(self).model_fields)) from None

    def replace(self, **overrides: Any) -> Self:
        """A validated copy with ``overrides`` applied."""
        return type(self)(**{**self.model_dump(), **overrides})

    def presets(self) -> dict[str, list[str]]:
        """Inhibition target presets by name (fnmatch patterns on module names)."""
        raise NotImplementedError


def middle(n: int, k: int) -> range:
    """Indices of the ``k`` middle items of ``n`` (all of them when ``k >= n``)."""
    k = max(1, min(k, n))
    start = (n - k) // 2
    return range(start, start + k)


#: The preset that inserts where the paper's authors do (arXiv 2312.11560, their code): on the
#: outputs of the 4 middle transformer blocks, or after every ConvGRU cell's hidden state.
PAPER_PRESET = "paper"

#: Inhibition settings a preset implies. ``paper`` treats every position x channel of a sample
#: as its own neuron (``layout="element"``), so top-1 modifies one value per sequence or image.
PRESET_SETTINGS: dict[str, dict[str, str]] = {PAPER_PRESET: {"layout": "element"}}


def layer_presets(n_layers: int, prefix: str, mlp_act: str, attn_out: str) -> dict[str, list[str]]:
    """The transformer presets shared by the decoder, encoder and ViT families.

    ``paper`` targets the blocks themselves (``{prefix}.{i}``): a forward hook on a block sees
    its output, the residual stream after the whole block.
    """
    return {
        "mlp": [f"{prefix}.*.{mlp_act}"],
        "mid_mlp": [f"{prefix}.{i}.{mlp_act}" for i in middle(n_layers, n_layers // 2)],
        "mid_attn4": [f"{prefix}.{i}.{attn_out}" for i in middle(n_layers, 4)],
        PAPER_PRESET: [f"{prefix}.{i}" for i in middle(n_layers, 4)],
    }


def check_seq_len(seq_len: int, context: int, field: str) -> None:
    """Raise InputError when a sequence is longer than the model's context."""
    if seq_len > context:
        raise InputError(
            f"seq_len={seq_len} exceeds the model's context ({field}={context}); "
            f"pass at most {context} tokens or build the model with a larger {field}"
        )


def check_ids(input_ids: Any, what: str = "input_ids") -> None:
    """Raise InputError unless ``input_ids`` is an integer tensor of shape [batch, seq_len]."""
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise InputError(
            f"{what}: expected an integer tensor of shape [batch, seq_len], "
            f"got {input_ids.dtype} of shape {tuple(input_ids.shape)}"
        )
