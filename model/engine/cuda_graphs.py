"""Decode-only steps replayed as CUDA graphs: one graph per padded batch size.

A decode step of the 2B model runs hundreds of small kernels, and on a fast GPU their launches from Python,
not the GPU, set its pace. A graph launches them all at once. It needs every shape fixed when it is
captured, so: the batch is padded up to the next captured size (padding rows write their K/V into a sink
block no sequence owns and attend to it alone); block tables are max_model_len wide; attention is the Triton
paged kernel, whose shapes do not depend on sequence lengths. The graphs end at the final norm: the LM head
runs outside, on the real rows only, so no graph holds a (batch, vocab) output.

With `capture=False` (the CPU, in tests) the same static-buffer step runs eagerly: everything but the
capture itself is exercised.
"""

from __future__ import annotations

import torch

from model.engine.attention import TritonAttention
from model.engine.sequence import Sequence
from model.qwen2vl import Qwen2VL


def padded_batch_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture, ending at max_num_seqs: powers of two to 16, then steps of 8, 16 (to 128) and
    32, so a padded batch above 128 is at most a fifth padding."""
    sizes = [1, 2, 4, 8, 16, 24, 32, *range(48, 129, 16), *range(160, max_num_seqs + 1, 32)]
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    """Static inputs and one captured graph per padded batch size; `run` feeds a decode-only step through."""

    def __init__(
        self,
        model: Qwen2VL,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        sink_block: int,
        max_num_seqs: int,
        max_blocks_per_seq: int,
    ):
        self.model = model
        self.k_cache, self.v_cache = k_cache, v_cache
        self.block_size = k_cache.shape[2]
        self.sink_block = sink_block
        self.sizes = padded_batch_sizes(max_num_seqs)
        device = model.device
        pin = device.type == "cuda"
        n = self.sizes[-1]
        # Rows: token id, position, cache slot, context length. Filled on the host, copied in one go.
        self.host_inputs = torch.zeros(4, n, dtype=torch.long, pin_memory=pin)
        self.host_tables = torch.full((n, max_blocks_per_seq), sink_block, dtype=torch.int32, pin_memory=pin)
        self.inputs = torch.zeros(4, n, dtype=torch.long, device=device)
        self.tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.steps = 0  # decode steps run through here

    def batch_size_for(self, num_seqs: int) -> int | None:
        """The padded size a step of `num_seqs` sequences runs at, or None if it is too big."""
        return next((s for s in self.sizes if s >= num_seqs), None)

    def _forward(self, size: int) -> torch.Tensor:
        """The step on the first `size` rows of the static buffers -> final hidden states (size, hidden)."""
        ids, positions, slots, lens = self.inputs[:, :size]
        ctx = TritonAttention.decode_only(
            self.k_cache, self.v_cache, slots, self.tables[:size], lens.to(torch.int32)
        )
        x = self.model.model.embed_tokens(ids)
        return self.model.hidden_states(x, positions.expand(3, -1), ctx)

    def _load(self, seqs: list[Sequence], size: int) -> None:
        inputs, tables = self.host_inputs.numpy(), self.host_tables.numpy()
        bs = self.block_size
        for i, seq in enumerate(seqs):
            pos, table = seq.num_computed, seq.block_table
            slot = table[pos // bs] * bs + pos % bs
            inputs[:, i] = (seq.token_ids[pos], pos + seq.rope_delta, slot, pos + 1)
            tables[i, : len(table)] = table  # entries past the context length are never read
        # Padding rows: token 0 at position 0, written to and read from the sink block only.
        inputs[:, len(seqs) : size] = [[0], [0], [self.sink_block * bs], [1]]
        tables[len(seqs) : size, 0] = self.sink_block
        # Asynchronous from pinned memory: the host buffers are next written after this step's tokens were
        # sampled, which waits for the GPU.
        self.inputs.copy_(self.host_inputs, non_blocking=True)
        self.tables[:size].copy_(self.host_tables[:size], non_blocking=True)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Hidden states (len(seqs), hidden) of a decode-only step: each sequence feeds its next token."""
        size = self.batch_size_for(len(seqs))
        self._load(seqs, size)
        self.steps += 1
        if size in self.graphs:
            graph, hidden = self.graphs[size]
            graph.replay()
        else:
            hidden = self._forward(size)
        return hidden[: len(seqs)]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per batch size, largest first so the smaller ones reuse its memory pool.

        Each graph is replayed once on padding rows and must reproduce the eager step's output there;
        a failure raises and leaves no graph behind, so the caller can carry on eagerly."""
        pool = None
        side = torch.cuda.Stream(self.model.device)
        try:
            for size in reversed(self.sizes):
                self._load([], size)
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up off the capture: compiles kernels, plans cuBLAS
                    expected = self._forward(size).clone()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    hidden = self._forward(size)
                pool = graph.pool()
                graph.replay()
                if not torch.allclose(hidden.float(), expected.float(), rtol=1e-2, atol=1e-2):
                    diff = (hidden.float() - expected.float()).abs().max().item()
                    raise RuntimeError(f"graph of batch {size} differs from the eager step by {diff}")
                self.graphs[size] = (graph, hidden)
        except BaseException:
            self.graphs.clear()
            raise
        torch.cuda.synchronize(self.model.device)
