"""Turns a scheduled step into tensors and runs the model: vision for new prefills, the packed LM, logits."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.engine.attention import BACKENDS
from model.engine.block_manager import blocks_needed
from model.engine.cuda_graphs import DecodeGraphs
from model.engine.kv_cache import CacheShape, allocate_kv_cache
from model.engine.scheduler import ScheduledBatch
from model.engine.sequence import Sequence, VisionItem
from model.qwen2vl import Qwen2VL
from model.scratch import Scratch

if TYPE_CHECKING:
    from model.engine.ranks import Ranks


def split_vision_item(item: VisionItem, max_patches: int) -> list[VisionItem]:
    """Cut a video into runs of temporal slices of at most `max_patches` patches; images stay whole.

    Vision attention never crosses a temporal slice and its rotary depends on (row, col) only, so the
    pieces encode to exactly the rows the whole video would give."""
    t, h, w = item.grid_thw
    per_slice = h * w
    if not item.is_video or t * per_slice <= max_patches:
        return [item]
    step = max(1, max_patches // per_slice)
    return [
        VisionItem(
            item.pixel_values[t0 * per_slice : min(t, t0 + step) * per_slice],
            (min(t, t0 + step) - t0, h, w),
            True,
        )
        for t0 in range(0, t, step)
    ]


def plan_vision_calls(sizes: list[int], max_patches: int) -> list[list[int]]:
    """Group item indices into calls of at most `max_patches` patches (an item larger than that runs
    alone). Items are taken by size so equal sizes sit together and batch inside the tower's attention."""
    calls: list[list[int]] = []
    total = max_patches + 1
    for i in sorted(range(len(sizes)), key=lambda j: sizes[j]):
        if total + sizes[i] > max_patches:
            calls.append([])
            total = 0
        calls[-1].append(i)
        total += sizes[i]
    return calls


def _decode_only(batch: ScheduledBatch) -> bool:
    """Every sequence feeds one generated token (no prompt token: a prompt's last chunk may be 1 long)."""
    return all(n == 1 and s.num_computed >= s.prompt_len for s, n in zip(batch.seqs, batch.num_new_tokens))


@dataclass
class StepInputs:
    """One step of the language model as every rank computes it: packed token ids (n,), M-RoPE positions
    (3, n), the vision embedding rows the step's prompt chunks take, the attention context's lists, and
    the rows whose logits are sampled."""

    ids: torch.Tensor
    positions: torch.Tensor
    vis_rows: torch.Tensor | None
    vis_embeds: torch.Tensor | None
    starts: list[int]
    num_new_tokens: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]


LM_HEAD_SLICE = 2048  # vocab rows per LM-head matmul on CPU (see ModelRunner.logits)
LM_HEAD_MIN_ROWS = 12  # fewer rows to sample: one plain LM-head matmul
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ModelRunner:
    """Owns the KV cache tensors; runs one scheduled step and returns the logits of sequences to sample."""

    def __init__(
        self,
        model: Qwen2VL,
        num_blocks: int,
        block_size: int,
        max_vision_patches: int,
        backend: str,
        ranks: Ranks | None = None,
    ):
        self.model, self.ranks = model, ranks  # ranks: rank 0's handle on the others (tensor parallel)
        self.config = model.config
        self.device, self.dtype = model.device, model.dtype
        self.max_vision_patches = max_vision_patches
        self.backend = backend
        self.attention = BACKENDS[backend]
        self.cache_shape = CacheShape.for_model(self.config, block_size, model.tp)
        # One block more than the block manager hands out: padding rows of a graphed decode step write there.
        self.sink_block = num_blocks
        self.k_cache, self.v_cache = allocate_kv_cache(
            self.cache_shape, num_blocks + 1, self.dtype, self.device
        )
        self.scratch = Scratch(self.device)
        self.decode_graphs: DecodeGraphs | None = None
        self.vision_seconds = 0.0  # wall time in the vision tower, for throughput figures
        self.vision_patches = 0

    def use_decode_graphs(self, max_num_seqs: int, max_model_len: int, capture: bool) -> None:
        """Run decode-only steps of up to max_num_seqs sequences on static buffers (triton backend), as CUDA
        graphs if `capture`. Raises if capturing fails; the runner then stays eager."""
        if self.backend != "triton":
            raise ValueError(f"decode graphs need the triton attention backend, not {self.backend!r}")
        graphs = DecodeGraphs(
            self.model,
            self.k_cache,
            self.v_cache,
            self.sink_block,
            max_num_seqs,
            blocks_needed(max_model_len, self.cache_shape.block_size),
        )
        if capture:
            graphs.capture()
        self.decode_graphs = graphs

    def sdpa_backends(self) -> contextlib.AbstractContextManager:
        """SDPA kernels the engine allows: on CUDA, not cuDNN's, which builds a graph on the CPU for every new
        sequence length, and every image or prompt length is new."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return sdpa_kernel(CUDA_SDPA_BACKENDS)

    @torch.inference_mode()
    def encode_vision(self, seqs: list[Sequence]) -> None:
        """Vision embeddings of every sequence in `seqs`, their images and videos packed into few calls
        (shared among the ranks under tensor parallelism)."""
        pieces: list[tuple[int, int, VisionItem]] = []  # (sequence, item, piece)
        for s, seq in enumerate(seqs):
            for i, item in enumerate(seq.vision_items):
                pieces.extend((s, i, p) for p in split_vision_item(item, self.max_vision_patches))
        sizes = [p.num_patches for _, _, p in pieces]
        size = self.ranks.tp.size if self.ranks else 1
        # Under tensor parallelism the calls are spread over the ranks: smaller calls, at least one each.
        per_call = min(self.max_vision_patches, max(1, -(-sum(sizes) // size)))
        calls = []
        for call in plan_vision_calls(sizes, per_call):
            pixels = torch.cat([pieces[j][2].pixel_values for j in call])
            calls.append((pixels, [pieces[j][2].grid_thw for j in call], call))
        if self.ranks:
            embeds = self.ranks.encode_vision([(pixels, grids) for pixels, grids, _ in calls], self)
        else:
            embeds = [self.encode_call(pixels, grids) for pixels, grids, _ in calls]
        merge2 = self.config.vision.spatial_merge_size**2
        outputs: list[torch.Tensor | None] = [None] * len(pieces)
        for (_, _, call), out in zip(calls, embeds):
            for j, part in zip(call, out.split([sizes[j] // merge2 for j in call])):
                outputs[j] = part

        per_item: dict[tuple[int, int], list[torch.Tensor]] = {}
        for (s, i, _), out in zip(pieces, outputs):
            per_item.setdefault((s, i), []).append(out)
        for s, seq in enumerate(seqs):
            images = [torch.cat(per_item[s, i]) for i, it in enumerate(seq.vision_items) if not it.is_video]
            videos = [torch.cat(per_item[s, i]) for i, it in enumerate(seq.vision_items) if it.is_video]
            ids = torch.tensor(seq.token_ids[: seq.prompt_len])
            seq.vision_embeds = self.model.vision_in_prompt_order(
                ids, torch.cat(images) if images else None, torch.cat(videos) if videos else None
            )
            is_pad = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
            seq.vision_slots = is_pad.nonzero().squeeze(1)

    @torch.inference_mode()
    def encode_call(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """One vision-tower call over packed images / video pieces -> their merged embeddings in order."""
        # Synchronised for vision_seconds: costs a little overlap, tells the tower's rate.
        sync = self.device.type == "cuda"
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        grid = torch.tensor(grids)
        embeds = self.model.encode_vision(pixels.to(self.device, self.dtype), grid)
        if sync:
            torch.cuda.synchronize()
        self.vision_seconds += time.perf_counter() - t0
        self.vision_patches += int(grid.prod(-1).sum())
        return embeds

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor | None]:
        """Run one step. Returns the sequences whose last token was computed (they sample next) and their
        float32 logits (n, vocab); partial prefill chunks produce no logits."""
        with self.sdpa_backends():
            return self._run(batch)

    def _run(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor | None]:
        graphs = self.decode_graphs
        if graphs is not None and graphs.batch_size_for(len(batch.seqs)) and _decode_only(batch):
            return batch.seqs, self.logits(graphs.run(batch.seqs))
        new_prefills = [s for s in batch.seqs if s.needs_vision]
        if new_prefills:
            self.encode_vision(new_prefills)
        step, to_sample = self.step_inputs(batch)
        if self.ranks:
            self.ranks.send_step(step)
        return to_sample, self.forward(step)

    def step_inputs(self, batch: ScheduledBatch) -> tuple[StepInputs, list[Sequence]]:
        """The tensors and lists of one step, everything a rank needs to compute it, and the sequences
        that sample after it."""
        ids: list[int] = []
        positions, vis_rows, vis_embeds, sample_rows, to_sample = [], [], [], [], []
        starts = [s.num_computed for s in batch.seqs]
        decode_pos: list[int] = []  # generated tokens sit at one position on all three axes
        for seq, start, n in zip(batch.seqs, starts, batch.num_new_tokens):
            offset, end = len(ids), start + n
            ids.extend(seq.token_ids[start:end])
            if n == 1 and start >= seq.prompt_len:
                decode_pos.append(start + seq.rope_delta)
            else:
                if decode_pos:
                    positions.append(torch.tensor(decode_pos).expand(3, -1))
                    decode_pos = []
                positions.append(seq.position_ids(start, end))
            if seq.vision_embeds is not None:
                lo, hi = torch.searchsorted(seq.vision_slots, torch.tensor([start, end])).tolist()
                if hi > lo:
                    vis_rows.append(seq.vision_slots[lo:hi] - start + offset)
                    vis_embeds.append(seq.vision_embeds[lo:hi])
            if end == seq.num_tokens:
                sample_rows.append(len(ids) - 1)
                to_sample.append(seq)
        if decode_pos:
            positions.append(torch.tensor(decode_pos).expand(3, -1))
        step = StepInputs(
            torch.tensor(ids),
            torch.cat(positions, dim=1),
            torch.cat(vis_rows) if vis_rows else None,
            torch.cat(vis_embeds) if vis_embeds else None,
            starts,
            list(batch.num_new_tokens),
            [s.block_table for s in batch.seqs],
            sample_rows,
        )
        return step, to_sample

    @torch.inference_mode()
    def forward(self, step: StepInputs) -> torch.Tensor | None:
        """The language model over one step's tokens, on every rank: the logits of its sample rows (on
        rank 0; None elsewhere, or if the step samples nothing)."""
        with self.sdpa_backends():
            x = self.model.model.embed_tokens(step.ids.to(self.device, non_blocking=True))
            if step.vis_rows is not None:
                x.index_copy_(0, step.vis_rows.to(self.device), step.vis_embeds.to(self.device, x.dtype))
            ctx = self.attention.for_step(
                self.k_cache, self.v_cache, step.starts, step.num_new_tokens, step.block_tables, self.scratch
            )
            hidden = self.model.hidden_states(x, step.positions.to(self.device), ctx)
            if not step.sample_rows:
                return None
            return self.logits(hidden.index_select(0, torch.tensor(step.sample_rows, device=self.device)))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits (n, vocab) of the rows to sample; on CPU they may live in a buffer the next step
        reuses.

        On CPU, for LM_HEAD_MIN_ROWS rows or more, the LM head runs as vocab slices of W @ hidden.T, each
        transposed into a reused logits buffer: MKL runs hidden @ W.T (a few rows by the whole vocabulary)
        far below its peak, the slices much closer to it (the README's engine benchmark has the figures).
        The values are those of hidden @ W.T to the bit; with fewer rows MKL's small-matrix path rounds the
        two differently, so those keep the plain LM head. Under tensor parallelism each rank computes its
        vocabulary slice so, and rank 0 gathers them."""
        local = self.local_logits(hidden)
        return self.model.tp.gather_vocab(local, self.config.vocab_size)

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of this rank's vocabulary rows (all of them without tensor parallelism)."""
        weight = self.model.lm_head.weight
        vocab, n = weight.shape[0], hidden.shape[0]
        if not hidden.is_cpu or hidden.dtype != torch.float32 or n < LM_HEAD_MIN_ROWS:
            return self.model.lm_head(hidden).float()
        part = self.scratch.get("logits_slice", (LM_HEAD_SLICE, n), torch.float32)
        logits = self.scratch.get("logits", (n, vocab), torch.float32)
        for lo in range(0, vocab, LM_HEAD_SLICE):
            hi = min(vocab, lo + LM_HEAD_SLICE)
            torch.mm(weight[lo:hi], hidden.t(), out=part[: hi - lo])
            logits[:, lo:hi].copy_(part[: hi - lo].t())  # transposed while the slice is still in cache
        return logits
