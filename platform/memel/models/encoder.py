"""BERT-style encoder classifier: post-LN layers, learned positions, [CLS]-pooled head.

Module names: ``embeddings.*``, ``layers.{i}.attention.{query,key,value,dense}``,
``layers.{i}.mlp.{dense_in,act,dense_out}``, ``pooler``, ``classifier``. Inhibition
targets: ``layers.{i}.attention.dense`` (attention output), ``layers.{i}.mlp.act`` and
``layers.{i}`` (the block's output after its final LayerNorm: preset ``paper``, as BERT's layer output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import InputError, check_ids, check_seq_len
from .family_configs import EncoderConfig


class Embeddings(nn.Module):
    """Word + learned position (+ token type) embeddings, LayerNorm, dropout."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embeddings = nn.Embedding(config.max_positions, config.d_model)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.d_model) if config.type_vocab_size else None
        )
        self.LayerNorm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention; ``dense`` is the attention output projection."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.query = nn.Linear(config.d_model, config.d_model)
        self.key = nn.Linear(config.d_model, config.d_model)
        self.value = nn.Linear(config.d_model, config.d_model)
        self.dense = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq, width = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.n_heads, -1).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.dense(out.transpose(1, 2).reshape(batch, seq, width))


class FeedForward(nn.Module):
    """``dense_out(act(dense_in(x)))`` with GELU as its own submodule."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.dense_in = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.dense_out = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_out(self.act(self.dense_in(x)))


class EncoderLayer(nn.Module):
    """Post-LN block: ``h = LN(x + attn(x)); LN(h + mlp(h))``."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config)
        self.attention_layernorm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = FeedForward(config.d_model, config.ffn_dim)
        self.output_layernorm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention_layernorm(x + self.dropout(self.attention(x, mask)))
        return self.output_layernorm(x + self.dropout(self.mlp(x)))


class EncoderClassifier(nn.Module):
    """``forward(input_ids [B, T], attention_mask=None, token_type_ids=None) -> logits [B, num_labels]``.

    ``attention_mask`` is 1 for tokens to attend to and 0 for padding; the first token is [CLS].
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_layers))
        self.pooler = nn.Linear(config.d_model, config.d_model)
        self.classifier = nn.Linear(config.d_model, config.num_labels)
        self.dropout = nn.Dropout(config.dropout)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_ids(input_ids)
        check_seq_len(input_ids.shape[1], self.config.max_positions, "max_positions")
        if token_type_ids is not None and self.embeddings.token_type_embeddings is None:
            raise InputError(
                "token_type_ids: this model has type_vocab_size=0; pass None or build with type_vocab_size>=1"
            )
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise InputError(
                    f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, "
                    f"got {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, mask)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return self.classifier(self.dropout(pooled))
