"""Attention backends for the decoder.

Decoder layers own no KV cache. Each layer computes q, k, v for the packed tokens of a step (flattened
across sequences, no padding), applies M-RoPE and calls `ctx.attend(layer_idx, q, k, v)`. The context
decides what the tokens see: `PackedPrefill` for a plain forward pass, `CachedAttention` over a `KVCache`
for the simple generate loop; the paged engine supplies its own context.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class AttentionContext(Protocol):
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (n, heads, d), k/v (n, kv_heads, d) of the packed step tokens -> (n, heads, d)."""
        ...


def _as_offsets(cu_seqlens: torch.Tensor | list[int]) -> list[int]:
    return torch.as_tensor(cu_seqlens).tolist() if not isinstance(cu_seqlens, list) else cu_seqlens


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, causal: bool = False) -> torch.Tensor:
    """SDPA on (n, heads, d) / (m, kv_heads, d) tensors; grouped kv heads are shared by their query heads."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
        attn_mask=mask, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1],
    )
    return out.transpose(0, 1)


class PackedPrefill:
    """Causal attention inside each sequence of a packed batch; nothing is cached."""

    def __init__(self, cu_seqlens: torch.Tensor | list[int]):
        self.cu_seqlens = _as_offsets(cu_seqlens)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bounds = zip(self.cu_seqlens[:-1], self.cu_seqlens[1:])
        return torch.cat([_sdpa(q[a:b], k[a:b], v[a:b], causal=True) for a, b in bounds])


class KVCache(nn.Module):
    """Contiguous per-slot cache: (layers, slots, max_len, kv_heads, d) keys and values."""

    def __init__(self, num_layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (num_layers, slots, max_len, kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.lengths = [0] * slots  # tokens stored per slot, advanced by the caller after each step
        self.max_len = max_len

    @classmethod
    def for_model(cls, config, slots: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        return cls(config.num_hidden_layers, slots, max_len, config.num_key_value_heads, config.head_dim,
                   dtype, device)

    def advance(self, slots: list[int], counts: list[int]) -> None:
        for s, n in zip(slots, counts, strict=True):
            self.lengths[s] += n


class CachedAttention:
    """One step over a KVCache: sequence i appends its new tokens to `slots[i]` and attends to all it holds.

    Works for prefill (many tokens per sequence, even a chunk after earlier ones) and decode (one each).
    The step's lengths are read from the cache when the context is made; call `finish()` after the forward.
    """

    def __init__(self, cache: KVCache, slots: list[int], cu_seqlens: torch.Tensor | list[int]):
        self.cache, self.slots = cache, list(slots)
        offsets = _as_offsets(cu_seqlens)
        self.bounds = list(zip(offsets[:-1], offsets[1:]))
        self.starts = [cache.lengths[s] for s in self.slots]
        self.counts = [b - a for a, b in self.bounds]
        for s, start, n in zip(self.slots, self.starts, self.counts):
            if start + n > cache.max_len:
                raise ValueError(f"KV cache slot {s} overflows: {start}+{n} tokens > max_len {cache.max_len}")
        self.single_token = all(n == 1 for n in self.counts)
        if self.single_token:
            self._decode_setup()

    def _decode_setup(self) -> None:
        device = self.cache.k.device
        self.slot_index = torch.tensor(self.slots, device=device)
        self.pos_index = torch.tensor(self.starts, device=device)
        self.kv_len = max(self.starts) + 1
        # Each sequence sees its own tokens only; shorter ones are masked out of the shared window.
        seen = torch.arange(self.kv_len, device=device)[None, :] <= self.pos_index[:, None]
        self.mask = seen[:, None, None, :]  # (batch, heads, q=1, kv)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ck, cv = self.cache.k[layer_idx], self.cache.v[layer_idx]
        if self.single_token:
            ck[self.slot_index, self.pos_index] = k
            cv[self.slot_index, self.pos_index] = v
            keys = ck[self.slot_index, : self.kv_len].transpose(1, 2)  # (batch, kv_heads, kv, d)
            values = cv[self.slot_index, : self.kv_len].transpose(1, 2)
            out = F.scaled_dot_product_attention(
                q[:, :, None, :], keys, values, attn_mask=self.mask, enable_gqa=keys.shape[1] != q.shape[1]
            )
            return out[:, :, 0, :]
        outs = []
        for slot, start, (a, b) in zip(self.slots, self.starts, self.bounds):
            end = start + (b - a)
            ck[slot, start:end] = k[a:b]
            cv[slot, start:end] = v[a:b]
            if start == 0:
                outs.append(_sdpa(q[a:b], k[a:b], v[a:b], causal=True))
            else:
                # A chunk after cached tokens: token j of the chunk sees cache positions <= start + j.
                rows = torch.arange(start, end, device=q.device)[:, None]
                allowed = torch.arange(end, device=q.device)[None, :] <= rows
                outs.append(_sdpa(q[a:b], ck[slot, :end], cv[slot, :end], mask=allowed))
        return torch.cat(outs)

    def finish(self) -> None:
        """Record the step's tokens as stored."""
        self.cache.advance(self.slots, self.counts)
