"""The SDPA backend: torch's scaled_dot_product_attention over the paged cache, on the CPU and CUDA alike.

Decodes run as one batched call over K/V gathered from their blocks (padded to the longest, masked). A
prefill chunk with nothing cached attends to its own K/V causally; a chunk after cached tokens gathers its
sequence's cache and uses a bottom-right causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.attention import grouped_sdpa
from model.engine.attention.paged import PagedAttention, count_decodes, pad_tables, slot_mapping
from model.scratch import Scratch


@dataclass
class PrefillChunk:
    """A prefill chunk: query rows [row_start, row_end) of the step, cache positions [start, start + n)."""

    row_start: int
    row_end: int
    start: int  # tokens of this sequence already cached before the chunk
    blocks: torch.Tensor | None  # block ids covering [0, start + n), only when start > 0
    mask: torch.Tensor | None  # (n, start + n) bottom-right causal, only when start > 0


def plan_prefills(
    starts: list[int], q_lens: list[int], block_tables: list[list[int]], num_decode: int, block_size: int,
    device: torch.device,
) -> list[PrefillChunk]:  # fmt: skip
    """The chunks of the step's sequences after its `num_decode` decodes."""
    chunks = []
    row = num_decode
    for i in range(num_decode, len(q_lens)):
        start, n = starts[i], q_lens[i]
        blocks = mask = None
        if start > 0:
            blocks = torch.tensor(block_tables[i][: -(-(start + n) // block_size)], device=device)
            q_pos = torch.arange(start, start + n, device=device)
            mask = torch.arange(start + n, device=device)[None, :] <= q_pos[:, None]
        chunks.append(PrefillChunk(row, row + n, start, blocks, mask))
        row += n
    return chunks


class SdpaAttention(PagedAttention):
    """Decodes over K/V gathered into reused buffers, prefill chunks through `grouped_sdpa`."""

    def __init__(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_decode: int,
        prefills: list[PrefillChunk],
        scratch: Scratch | None = None,
    ):
        super().__init__(k_cache, v_cache, slot_mapping)
        self.num_decode, self.prefills = num_decode, prefills
        self.scratch = scratch or Scratch(k_cache.device)

    @classmethod
    def for_step(cls, k_cache, v_cache, starts, q_lens, block_tables, scratch=None) -> SdpaAttention:
        device, bs = k_cache.device, k_cache.shape[2]
        num_decode = count_decodes(q_lens)
        slots = slot_mapping(starts, q_lens, block_tables, bs).to(device, non_blocking=True)
        prefills = plan_prefills(starts, q_lens, block_tables, num_decode, bs, device)
        ctx = cls(k_cache, v_cache, slots, num_decode, prefills, scratch)
        if num_decode:
            ctx.plan_decodes(block_tables[:num_decode], [s + 1 for s in starts[:num_decode]])
        return ctx

    def plan_decodes(self, tables: list[list[int]], context_lens: list[int]) -> None:
        """The decodes' blocks, flattened for one gather, and a mask of their lengths."""
        device = self.k_cache.device
        padded = pad_tables(tables, device, torch.long)
        width = padded.shape[1] * self.k_cache.shape[2]
        self.decode_blocks = padded.flatten()  # one index_select per layer gathers them all
        lens = torch.tensor(context_lens, device=device)
        self.decode_mask = (torch.arange(width, device=device)[None, :] < lens[:, None])[:, None, None, :]

    def attend_cached(self, q, k, v, kc, vc) -> torch.Tensor:
        if not self.prefills:
            return self.decode(q, kc, vc)
        out = torch.empty_like(q)
        if self.num_decode:
            out[: self.num_decode] = self.decode(q[: self.num_decode], kc, vc)
        for p in self.prefills:
            rows = slice(p.row_start, p.row_end)
            if p.start == 0:
                out[rows] = grouped_sdpa(q[rows], k[rows], v[rows], causal=True)
            else:
                keys = kc[p.blocks].flatten(0, 1)[: p.mask.shape[1]]
                values = vc[p.blocks].flatten(0, 1)[: p.mask.shape[1]]
                out[rows] = grouped_sdpa(q[rows], keys.to(q.dtype), values.to(q.dtype), mask=p.mask)
        return out

    def decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        """One query token per sequence against its cached K/V, all sequences in one call."""
        batch, heads, dim = q.shape
        kv_heads = kc.shape[2]
        # Gathered into buffers every layer and step reuses: fresh ones would be faulted in each time.
        shape = (len(self.decode_blocks), *kc.shape[1:])
        keys, values = (
            torch.index_select(cache, 0, self.decode_blocks, out=self.scratch.get(name, shape, cache.dtype))
            .view(batch, -1, kv_heads, dim)
            .transpose(1, 2)  # (batch, kv_heads, width, dim)
            for name, cache in (("keys", kc), ("values", vc))
        )
        # The query heads sharing a kv head become that head's query rows: no copy of K/V per query head.
        grouped = q.view(batch, kv_heads, heads // kv_heads, dim)
        out = F.scaled_dot_product_attention(
            grouped, keys.to(q.dtype), values.to(q.dtype), attn_mask=self.decode_mask
        )
        return out.reshape(batch, heads, dim)
