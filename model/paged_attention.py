"""The engine's attention context: one step of packed tokens over the paged KV cache.

Each step mixes decodes (one query token per sequence) and prefill chunks (many). Every layer first writes
the step's K/V into the cache slots of its tokens, then attends. Three backends:
- `flash`: flash-attn's varlen kernel reads the paged cache through the block table (CUDA, flash_attn
  installed; its paged mode needs block_size % 256 == 0).
- `sdpa`: torch SDPA. Decodes run as one batched call over K/V gathered from their blocks (padded to the
  longest, masked); a prefill chunk with nothing cached attends to its own K/V causally; a chunk after
  cached tokens gathers its sequence's cache and uses a bottom-right causal mask. CPU and CUDA alike.
- `triton`: prefill chunks as `sdpa`; decodes through model/triton_attention.py, which reads the cache in
  place (CUDA without flash-attn; the tests run it on the CPU through Triton's interpreter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.scratch import Scratch
from model.triton_attention import paged_decode_attention, triton_available

try:  # optional: only on CUDA machines that have the package
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


BACKENDS = ("flash", "triton", "sdpa")


def pick_backend(device: torch.device, dtype: torch.dtype) -> str:
    """flash-attn where it can run (CUDA, half precision, package installed), else the Triton decode kernel
    on CUDA, SDPA everywhere else."""
    if device.type != "cuda":
        return "sdpa"
    if dtype in (torch.bfloat16, torch.float16) and flash_attn_varlen_func is not None:
        return "flash"
    return "triton" if triton_available(device) else "sdpa"


def backend_problem(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `backend` cannot run here, or None."""
    if backend not in BACKENDS:
        return f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}"
    half = dtype in (torch.bfloat16, torch.float16)
    if backend == "flash" and (device.type != "cuda" or not half or flash_attn_varlen_func is None):
        return "the flash backend needs CUDA, bf16/fp16 weights and the flash_attn package"
    if backend == "triton" and not triton_available(device):
        return "the triton backend needs CUDA and the triton package (or TRITON_INTERPRET=1 on the CPU)"
    return None


@dataclass
class _Prefill:
    """A prefill chunk: query rows [row_start, row_end) of the step, cache positions [start, start + n)."""

    row_start: int
    row_end: int
    start: int  # tokens of this sequence already cached before the chunk
    blocks: torch.Tensor | None  # block ids covering [0, start + n), only when start > 0
    mask: torch.Tensor | None  # (n, start + n) bottom-right causal, only when start > 0


class PagedAttention:
    """Attention context of one engine step. Decode sequences must come first in the packed batch."""

    def __init__(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        starts: list[int],
        q_lens: list[int],
        block_tables: list[list[int]],
        backend: str = "sdpa",
        scratch: Scratch | None = None,
    ):
        self.k_cache, self.v_cache = k_cache, v_cache  # (layers, blocks, block_size, kv_heads, head_dim)
        self.backend = backend
        self.scratch = scratch or Scratch(k_cache.device)
        device = k_cache.device
        bs = k_cache.shape[2]
        self.block_size = bs
        ctx_lens = [s + n for s, n in zip(starts, q_lens)]
        self.slot_mapping = _slot_mapping(starts, q_lens, block_tables, bs).to(device, non_blocking=True)

        if backend == "flash":
            self.cu_q = _offsets(q_lens, device)
            self.cu_k = _offsets(ctx_lens, device)
            self.max_q, self.max_k = max(q_lens), max(ctx_lens)
            self.block_table = _pad_tables(block_tables, device, torch.int32)
            return

        self.num_decode = 0
        while self.num_decode < len(q_lens) and q_lens[self.num_decode] == 1:
            self.num_decode += 1
        if self.num_decode and backend == "triton":
            self.dec_tables = _pad_tables(block_tables[: self.num_decode], device, torch.int32)
            self.dec_lens = torch.tensor(ctx_lens[: self.num_decode], dtype=torch.int32).to(device)
        elif self.num_decode:
            dec_tables = block_tables[: self.num_decode]
            tables = _pad_tables(dec_tables, device, torch.long)
            width = tables.shape[1] * bs
            self.dec_blocks = tables.flatten()  # one index_select per layer gathers them all
            lens = torch.tensor(ctx_lens[: self.num_decode], device=device)
            self.dec_mask = (torch.arange(width, device=device)[None, :] < lens[:, None])[:, None, None, :]
        self.prefills: list[_Prefill] = []
        row = self.num_decode
        for i in range(self.num_decode, len(q_lens)):
            start, n = starts[i], q_lens[i]
            blocks = mask = None
            if start > 0:
                blocks = torch.tensor(block_tables[i][: -(-(start + n) // bs)], device=device)
                q_pos = torch.arange(start, start + n, device=device)
                mask = torch.arange(start + n, device=device)[None, :] <= q_pos[:, None]
            self.prefills.append(_Prefill(row, row + n, start, blocks, mask))
            row += n

    @classmethod
    def decode_step(
        cls,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
    ) -> PagedAttention:
        """A decode-only step whose inputs are already device tensors (the triton backend): nothing here
        reads them on the host, so the step can be captured in a CUDA graph."""
        ctx = cls.__new__(cls)
        ctx.k_cache, ctx.v_cache, ctx.backend = k_cache, v_cache, "triton"
        ctx.block_size = k_cache.shape[2]
        ctx.slot_mapping, ctx.dec_tables, ctx.dec_lens = slot_mapping, block_tables, context_lens
        ctx.num_decode, ctx.prefills = len(slot_mapping), []
        return ctx

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.k_cache[layer_idx], self.v_cache[layer_idx]
        # Store first: every token then finds its own K/V, and earlier chunks', in the cache.
        kc.view(-1, *kc.shape[2:]).index_copy_(0, self.slot_mapping, k.to(kc.dtype))
        vc.view(-1, *vc.shape[2:]).index_copy_(0, self.slot_mapping, v.to(vc.dtype))
        if self.backend == "flash":
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
        if not self.prefills:
            return self._decode(q, kc, vc)
        out = torch.empty_like(q)
        if self.num_decode:
            out[: self.num_decode] = self._decode(q[: self.num_decode], kc, vc)
        for p in self.prefills:
            qs = q[p.row_start : p.row_end]
            if p.start == 0:
                out[p.row_start : p.row_end] = _causal(
                    qs, k[p.row_start : p.row_end], v[p.row_start : p.row_end]
                )
            else:
                keys = kc[p.blocks].flatten(0, 1)[: p.mask.shape[1]]
                values = vc[p.blocks].flatten(0, 1)[: p.mask.shape[1]]
                out[p.row_start : p.row_end] = _masked(qs, keys, values, p.mask)
        return out

    def _decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        """One query token per sequence against its cached K/V, all sequences in one call."""
        if self.backend == "triton":
            return paged_decode_attention(q, kc, vc, self.dec_tables, self.dec_lens)
        batch, heads, dim = q.shape
        kv_heads = kc.shape[2]
        # Gathered into buffers every layer and step reuses: fresh ones would be faulted in each time.
        shape = (len(self.dec_blocks), *kc.shape[1:])
        keys, values = (
            torch.index_select(cache, 0, self.dec_blocks, out=self.scratch.get(name, shape, cache.dtype))
            .view(batch, -1, kv_heads, dim)
            .transpose(1, 2)  # (batch, kv_heads, width, dim)
            for name, cache in (("keys", kc), ("values", vc))
        )
        # The query heads sharing a kv head become that head's query rows: no copy of K/V per query head.
        grouped = q.view(batch, kv_heads, heads // kv_heads, dim)
        out = F.scaled_dot_product_attention(
            grouped, keys.to(q.dtype), values.to(q.dtype), attn_mask=self.dec_mask
        )
        return out.reshape(batch, heads, dim)


def _slot_mapping(starts: list[int], q_lens: list[int], tables: list[list[int]], bs: int) -> torch.Tensor:
    """Flat cache slot of every token of the step, in packed order."""
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


def _offsets(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)


def _pad_tables(tables: list[list[int]], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Padding points at block 0: whatever it holds is masked out (SDPA) or past cu_seqlens_k (flash).
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=dtype).to(device)


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of one chunk with nothing cached before it."""
    return _grouped_sdpa(q, k, v, causal=True)


def _masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A chunk's queries against its sequence's cached K/V under a boolean (n, m) mask."""
    return _grouped_sdpa(q, k.to(q.dtype), v.to(q.dtype), mask=mask)


def _grouped_sdpa(
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
