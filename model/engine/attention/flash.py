"""The flash-attn backend: its varlen kernel reads the paged cache through the block table, decodes and
prefill chunks in one call (CUDA, half precision, flash_attn installed; its paged mode needs
block_size % 256 == 0)."""

from __future__ import annotations

import torch

from model.engine.attention.paged import PagedAttention, pad_tables, slot_mapping

try:  # optional: only on CUDA machines that have the package
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

BLOCK_SIZE = 256  # what flash-attn's paged mode takes (any multiple of it)


def _offsets(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)


class FlashAttention(PagedAttention):
    """Every sequence of the step in one `flash_attn_varlen_func` call over the paged cache."""

    def __init__(self, k_cache, v_cache, slot_mapping, cu_q, cu_k, max_q: int, max_k: int, block_table):
        super().__init__(k_cache, v_cache, slot_mapping)
        self.cu_q, self.cu_k, self.max_q, self.max_k = cu_q, cu_k, max_q, max_k
        self.block_table = block_table

    @staticmethod
    def problem(device: torch.device, dtype: torch.dtype) -> str | None:
        half = dtype in (torch.bfloat16, torch.float16)
        if device.type != "cuda" or not half or flash_attn_varlen_func is None:
            return "the flash backend needs CUDA, bf16/fp16 weights and the flash_attn package"
        return None

    @classmethod
    def for_step(cls, k_cache, v_cache, starts, q_lens, block_tables, scratch=None) -> FlashAttention:
        device = k_cache.device
        ctx_lens = [s + n for s, n in zip(starts, q_lens)]
        slots = slot_mapping(starts, q_lens, block_tables, k_cache.shape[2]).to(device, non_blocking=True)
        return cls(
            k_cache, v_cache, slots, _offsets(q_lens, device), _offsets(ctx_lens, device),
            max(q_lens), max(ctx_lens), pad_tables(block_tables, device, torch.int32),
        )  # fmt: skip

    def attend_cached(self, q, k, v, kc, vc) -> torch.Tensor:
        return flash_attn_varlen_func(
            q,
            kc,
            vc,
            cu_seqlens_q=self.cu_q,
            cu_seqlens_k=self.cu_k,
            max_seqlen_q=self.max_q,
            max_seqlen_k=self.max_k,
            causal=True,
            block_table=self.block_table,
        )
