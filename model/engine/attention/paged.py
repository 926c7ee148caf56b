"""The interface of the engine's attention backends: one step of packed tokens over the paged KV cache.

Each step mixes decodes (one query token per sequence, first in the packed batch) and prefill chunks
(many). Every layer first writes the step's K/V into the cache slots of its tokens, then the backend
attends; the backends differ only in how they read the cache back.
"""

from __future__ import annotations

import torch


class PagedAttention:
    """Attention context (model.attention.AttentionContext) of one engine step; subclasses attend."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor):
        self.k_cache, self.v_cache = k_cache, v_cache  # (layers, blocks, block_size, kv_heads, head_dim)
        self.slot_mapping = slot_mapping  # flat cache slot of every token of the step, in packed order

    @classmethod
    def for_step(
        cls,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        starts: list[int],
        q_lens: list[int],
        block_tables: list[list[int]],
        scratch=None,
    ) -> PagedAttention:
        """The context of a step: sequence i computes tokens [starts[i], starts[i] + q_lens[i])."""
        raise NotImplementedError

    @staticmethod
    def problem(device: torch.device, dtype: torch.dtype) -> str | None:
        """Why this backend cannot run here, or None."""
        return None

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
        # Store first: every token then finds its own K/V, and earlier chunks', in the cache.
        kc.view(-1, *kc.shape[2:]).index_copy_(0, self.slot_mapping, k.to(kc.dtype))
        vc.view(-1, *vc.shape[2:]).index_copy_(0, self.slot_mapping, v.to(vc.dtype))
        return self.attend_cached(q, k, v, kc, vc)

    def attend_cached(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor
    ) -> torch.Tensor:
        """The step's queries against one layer's cache (blocks, block_size, kv_heads, d), already holding
        this step's K/V; k/v are also given as computed."""
        raise NotImplementedError


def slot_mapping(starts: list[int], q_lens: list[int], tables: list[list[int]], bs: int) -> torch.Tensor:
    """Flat cache slot of every token of the step, in packed order (on the host)."""
    pieces, singles = [], []
    for start, n, table in zip(starts, q_lens, tables):
        if n == 1:  # decodes: plain ints, no tensor per sequence
            singles.append(table[start // bs] * bs + start % bs)
            continue
        if singles:
            pieces.append(torch.tensor(singles))
            singles = []
        pos = torch.arange(start, start + n)
        pieces.append(torch.tensor(table)[pos // bs] * bs + pos % bs)
    if singles:
        pieces.append(torch.tensor(singles))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def pad_tables(tables: list[list[int]], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Block tables as one (n, longest) tensor. Padding points at block 0: whatever it holds is masked out
    or lies past the sequence's length."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=dtype).to(device)


def count_decodes(q_lens: list[int]) -> int:
    """Leading sequences of the step that feed one token each."""
    n = 0
    while n < len(q_lens) and q_lens[n] == 1:
        n += 1
    return n
