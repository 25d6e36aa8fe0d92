"""Decoder-only language model in the GPT-NeoX / Pythia layout.

Rotary embeddings on ``rotary_pct`` of each head's dims, parallel residual
``x + attn(ln1(x)) + mlp(ln2(x))``, LayerNorms with bias, fused QKV, untied input
embedding and output head. Module names follow Hugging Face ``GPTNeoXForCausalLM`` with
the ``gpt_neox.`` prefix dropped; inhibition targets are ``layers.{i}.mlp.act`` (after the
GELU), ``layers.{i}.attention.dense`` (attention output) and ``layers.{i}`` (the block's
output, the residual stream: preset ``paper``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import check_ids, check_seq_len
from .family_configs import DecoderConfig


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embedding (NeoX "rotate half" convention)."""

    inv_freq: torch.Tensor

    def __init__(self, dims: int, base: float) -> None:
        super().__init__()
        self.dims = dims
        inv_freq = 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float32) / max(dims, 1)))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x`` [..., T, head_dim]; the rest pass through."""
    dims = cos.shape[-1]
    if dims == 0:
        return x
    rot, rest = x[..., :dims], x[..., dims:]
    first, second = rot.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


class Attention(nn.Module):
    """Causal multi-head self-attention with fused QKV and rotary embeddings."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.d_model, 3 * config.d_model)
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.rotary = RotaryEmbedding(config.rotary_dims, config.rotary_base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        qkv = self.query_key_value(x).view(batch, seq, self.n_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        cos, sin = self.rotary(seq, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense(out.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Module):
    """``dense_4h_to_h(act(dense_h_to_4h(x)))``; ``act`` is a submodule so it can be targeted."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.dense_4h_to_h = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class DecoderLayer(nn.Module):
    """One GPT-NeoX layer with parallel residual."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config.d_model, config.ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.input_layernorm(x)) + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    """Causal LM: ``forward(input_ids [B, T]) -> logits [B, T, vocab_size]``."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_in = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layers))
        self.final_layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.embed_out = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Pythia's init: small_init (std sqrt(2/(5d))) everywhere, wang_init on output projections."""
        small = math.sqrt(2.0 / (5.0 * self.config.d_model))
        wang = 2.0 / (self.config.n_layers * math.sqrt(self.config.d_model))
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = wang if name.endswith(("attention.dense", "mlp.dense_4h_to_h")) else small
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_ids(input_ids)
        check_seq_len(input_ids.shape[1], self.config.context_length, "context_length")
        x = self.embed_in(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.embed_out(self.final_layer_norm(x))


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` [B, T, V] against ``input_ids`` [B, T]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
