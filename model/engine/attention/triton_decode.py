"""The Triton backend: prefill chunks as the SDPA backend, decodes through a Triton kernel that reads each
sequence's K/V where they lie in the paged cache, through its block table.

The SDPA path has to gather every decoding sequence's blocks into a dense (batch, width) copy each layer and
then read the copy again: three passes over the whole KV cache per step, padded to the longest sequence. This
kernel reads each sequence's own tokens once. Its shapes depend only on the batch size, not on the sequence
lengths (those are data), so a decode step built on it can be captured in a CUDA graph
(model/engine/cuda_graphs.py). Runs on CUDA; tests run it on the CPU through Triton's interpreter
(TRITON_INTERPRET=1, set before this module is imported).
"""

from __future__ import annotations

import math
import os

import torch

from model.engine.attention.paged import pad_tables
from model.engine.attention.sdpa import SdpaAttention

try:  # ships with CUDA builds of torch; on the CPU only the tests' interpreter needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

TILE = 64  # cache positions per inner step: a (TILE, head_dim) slab of K and of V


def triton_available(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: CUDA with Triton, or any device under Triton's interpreter."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr,
        stride_qb, stride_qh, stride_kblock, stride_kslot, stride_khead, stride_tb, stride_ob, stride_oh,
        scale,
        GROUP: tl.constexpr, GROUP_P: tl.constexpr, DIM: tl.constexpr, DIM_P: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        # One program per (sequence, kv head): the GROUP query heads sharing the kv head are the rows of
        # one small matmul against each K/V slab, so the slab is read once for all of them.
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        length = tl.load(lens_ptr + seq)
        g = tl.arange(0, GROUP_P)
        d = tl.arange(0, DIM_P)
        heads = kv_head * GROUP + g
        q_mask = (g[:, None] < GROUP) & (d[None, :] < DIM)
        q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
        # float32 operands: bf16/fp16 values are exact in tf32, so the products are those of a half-precision
        # dot, and the softmax weights keep 10 mantissa bits in P @ V. The kernel is bound by reading K/V,
        # not by the matmul rate, and Triton's interpreter (the CPU tests) only gets float32 dots right.
        q = q.to(tl.float32)
        m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_P], tl.float32)
        acc = tl.zeros([GROUP_P, DIM_P], tl.float32)
        t = tl.arange(0, TILE)
        for start in range(0, length, TILE):
            pos = start + t
            valid = pos < length
            block = tl.load(tables_ptr + seq * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0)
            # int64: a 72B model's cache passes 2**31 elements per layer
            row = block.to(tl.int64) * stride_kblock + (pos % BLOCK_SIZE) * stride_kslot
            kv_at = row[:, None] + kv_head * stride_khead + d[None, :]
            kv_mask = valid[:, None] & (d[None, :] < DIM)
            k = tl.load(k_ptr + kv_at, mask=kv_mask, other=0.0).to(tl.float32)
            v = tl.load(v_ptr + kv_at, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds a valid position
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        out_at = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    """q (batch, heads, dim) against each sequence's first context_lens[i] cached tokens.

    k_cache/v_cache: one layer, (blocks, block_size, kv_heads, dim); block_tables (batch, width) int32;
    context_lens (batch,) int32, each >= 1. Returns (batch, heads, dim) in q's dtype."""
    batch, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride() or q.stride(-1) != 1:
        raise ValueError("paged_decode_attention needs contiguous head dims and K/V caches of one layout")
    group = heads // kv_heads
    out = torch.empty_like(q)
    _paged_decode_kernel[(batch, kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        1.0 / math.sqrt(dim),
        GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)),  # tl.dot wants >= 16 rows
        DIM=dim, DIM_P=max(16, triton.next_power_of_2(dim)),
        BLOCK_SIZE=block_size, TILE=TILE,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return out


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> torch.Tensor:
    """What `paged_decode_attention` computes, written plainly: a float64 softmax per sequence over the
    tokens its block table points at. For the start-up check and the tests."""
    heads, (_, block_size, kv_heads, dim) = q.shape[1], k_cache.shape
    out = []
    for i, n in enumerate(context_lens.tolist()):
        blocks = block_tables[i, : -(-n // block_size)].long()
        # (n, heads, dim): each kv head repeated for the query heads of its group
        keys, values = (
            c[blocks].flatten(0, 1)[:n].double().repeat_interleave(heads // kv_heads, 1)
            for c in (k_cache, v_cache)
        )
        weights = (torch.einsum("hd,nhd->hn", q[i].double(), keys) / math.sqrt(dim)).softmax(-1)
        out.append(torch.einsum("hn,nhd->hd", weights, values))
    return torch.stack(out)


def kernel_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """Run the kernel once on random data against a plain softmax reference: None if it agrees, else why.
    The engine asks before picking the kernel by itself, so a Triton that cannot build it costs speed only."""
    gen = torch.Generator().manual_seed(0)
    blocks, block_size, kv_heads, group, dim = 12, 16, 2, 6, 128
    shape = (blocks, block_size, kv_heads, dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(3, kv_heads * group, dim, generator=gen).to(dtype)
    lens = torch.tensor([1, 37, 150], dtype=torch.int32)
    tables = torch.stack([torch.randperm(blocks, generator=gen)[:10] for _ in lens]).int()
    expected = decode_attention_reference(q, k_cache, v_cache, tables, lens)  # from the same rounded inputs
    try:
        out = paged_decode_attention(*(x.to(device) for x in (q, k_cache, v_cache, tables, lens)))
    except Exception as e:  # a compiler error names itself; the engine reports it
        return f"{type(e).__name__}: {e}"
    error = (out.cpu().double() - expected).abs().max().item()
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2  # tf32 rounds the weights for P @ V
    return None if error <= tolerance else f"differs from the reference by {error:.3g}"


class TritonAttention(SdpaAttention):
    """Decodes through `paged_decode_attention`; prefill chunks as `SdpaAttention`. CUDA without flash-attn
    (the tests run it on the CPU through Triton's interpreter)."""

    @staticmethod
    def problem(device: torch.device, dtype: torch.dtype) -> str | None:
        if not triton_available(device):
            return "the triton backend needs CUDA and the triton package (or TRITON_INTERPRET=1 on the CPU)"
        return None

    @classmethod
    def decode_only(
        cls,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
    ) -> TritonAttention:
        """A decode-only step whose inputs are already device tensors: nothing here reads them on the host,
        so the step can be captured in a CUDA graph."""
        ctx = cls(k_cache, v_cache, slot_mapping, len(slot_mapping), [])
        ctx.block_tables, ctx.context_lens = block_tables, context_lens
        return ctx

    def plan_decodes(self, tables: list[list[int]], context_lens: list[int]) -> None:
        device = self.k_cache.device
        self.block_tables = pad_tables(tables, device, torch.int32)
        self.context_lens = torch.tensor(context_lens, dtype=torch.int32).to(device)

    def decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        return paged_decode_attention(q, kc, vc, self.block_tables, self.context_lens)
