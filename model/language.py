"""Qwen2 decoder with M-RoPE over packed tokens (no batch dim, no padding); attention through a context."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import AttentionContext
from model.config import Qwen2VLConfig
from model.parallel import (
    SINGLE,
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
    even_range,
)
from model.rope import MRotary, apply_rotary
from model.scratch import map_rows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the input dtype (as the checkpoints were trained).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward; under tensor parallelism a rank holds a range of the inner dimension."""

    def __init__(self, config: Qwen2VLConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        rows = even_range(inner, tp.rank, tp.size)
        self.gate_proj = ColumnParallelLinear(hidden, inner, rows, bias=False)
        self.up_proj = ColumnParallelLinear(hidden, inner, rows, bias=False)
        self.down_proj = RowParallelLinear(inner, hidden, rows, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return map_rows(self._forward, x, self.gate_proj.out_features)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.silu(self.gate_proj(x), inplace=True)  # in place: one (rows, intermediate) buffer fewer
        return self.down_proj(gate.mul_(self.up_proj(x)))


class Attention(nn.Module):
    """Grouped-query attention with biased q/k/v projections; under tensor parallelism a rank holds a
    range of the query heads and the key/value heads they read."""

    def __init__(self, config: Qwen2VLConfig, layer_idx: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.layer_idx = layer_idx
        heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        (q_lo, q_hi), (kv_lo, kv_hi) = tp.head_ranges(heads, kv_heads)
        self.n_heads, self.n_kv_heads, self.head_dim = q_hi - q_lo, kv_hi - kv_lo, d
        hidden = config.hidden_size
        self.q_proj = ColumnParallelLinear(hidden, heads * d, (q_lo * d, q_hi * d), bias=True)
        self.k_proj = ColumnParallelLinear(hidden, kv_heads * d, (kv_lo * d, kv_hi * d), bias=True)
        self.v_proj = ColumnParallelLinear(hidden, kv_heads * d, (kv_lo * d, kv_hi * d), bias=True)
        self.o_proj = RowParallelLinear(heads * d, hidden, (q_lo * d, q_hi * d), tp)

    def forward(self, x, cos, sin, ctx: AttentionContext) -> torch.Tensor:
        q = self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(ctx.attend(self.layer_idx, q, k, v).flatten(1))


class DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2VLConfig, layer_idx: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)

    def forward(self, x, cos, sin, ctx: AttentionContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    """Embeddings, decoder layers and final norm; the LM head lives on the top-level model."""

    def __init__(self, config: Qwen2VLConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, i, tp) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = MRotary(config)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        ctx: AttentionContext | None = None,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed tokens (n,) or embeddings (n, hidden) at positions (3, n) -> final hidden states."""
        if (input_ids is None) == (input_embeds is None):
            raise ValueError("pass exactly one of input_ids and input_embeds")
        x = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        if position_ids is None or position_ids.shape != (3, x.shape[0]):
            raise ValueError(f"position_ids must have shape (3, {x.shape[0]}); build them with model.rope")
        if ctx is None:
            raise ValueError("an attention context is required (e.g. attention.PackedPrefill([0, n]))")
        cos, sin = self.rotary(position_ids.to(x.device), x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, ctx)
        return self.norm(x)
