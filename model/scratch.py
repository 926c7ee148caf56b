"""Large CPU temporaries without page faults: reused scratch buffers and row-chunked layers.

glibc hands large freed blocks back to the kernel (always above 32 MiB, often below), so the next large
tensor is faulted in page by page; on the CPU VMs we bench on that can cost nearly as much as the matmul
that fills it. Two cures:
buffers the engine keeps across steps, and row-wise layers run over row chunks so that every intermediate
stays small (and in cache). Row chunks give the same numbers as long as their row counts are powers of
two: MKL computes rows in blocks and a row in a short tail block may round differently, so chunk edges must
fall on the whole matrix's block edges.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

CHUNK_BYTES = 16 << 20  # largest intermediate a row chunk makes: half of glibc's mmap threshold


def map_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, width: int) -> torch.Tensor:
    """fn(x) for a row-wise fn whose widest intermediate has `width` columns, over row chunks on CPU.

    Other devices have a caching allocator and want the biggest matmuls: there fn(x) runs in one call."""
    rows = 1 << max(0, (CHUNK_BYTES // (width * x.element_size())).bit_length() - 1)  # a power of two
    if not x.is_cpu or x.shape[0] <= rows:
        return fn(x)
    return torch.cat([fn(chunk) for chunk in x.split(rows)])


class Scratch:
    """Named buffers reused from step to step; grown when a step needs more, never shrunk."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised (shape) tensor; the previous one of the same name is overwritten."""
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = self.buffers[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel].view(shape)
