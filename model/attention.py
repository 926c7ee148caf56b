"""How the decoder's layers reach attention, and the one SDPA call every path uses.

Decoder layers own no KV cache. Each layer computes q, k, v for the packed tokens of a step (flattened
across sequences, no padding), applies M-RoPE and calls `ctx.attend(layer_idx, q, k, v)`. The context
decides what the tokens see: `PackedPrefill` for a plain forward pass over whole prompts; the engine's
backends (model/engine/attention/) over its paged KV cache.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionContext(Protocol):
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (n, heads, d), k/v (n, kv_heads, d) of the packed step tokens -> (n, heads, d)."""
        ...


def grouped_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False
) -> torch.Tensor:
    """q (n, heads, d) against k/v (m, kv_heads, d) in one 4-D SDPA call.

    Query heads are grouped under the kv head they share, (kv_heads, group, n, d), and K/V are broadcast
    over the group as views: no copy per query head, and 4-D inputs keep SDPA on its fused CPU kernel
    (3-D inputs are several times slower there)."""
    n, heads, d = q.shape
    m, kv_heads, _ = k.shape
    group = heads // kv_heads
    qg = q.view(n, kv_heads, group, d).permute(1, 2, 0, 3)
    kg, vg = (x.transpose(0, 1)[:, None].expand(kv_heads, group, m, d) for x in (k, v))
    out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, is_causal=causal)
    return out.permute(2, 0, 1, 3).reshape(n, heads, d)


class PackedPrefill:
    """Causal attention inside each sequence of a packed batch; nothing is cached."""

    def __init__(self, cu_seqlens: torch.Tensor | list[int]):
        is_list = isinstance(cu_seqlens, list)
        self.cu_seqlens = cu_seqlens if is_list else torch.as_tensor(cu_seqlens).tolist()

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bounds = zip(self.cu_seqlens[:-1], self.cu_seqlens[1:])
        return torch.cat([grouped_sdpa(q[a:b], k[a:b], v[a:b], causal=True) for a, b in bounds])
