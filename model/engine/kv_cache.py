"""The paged KV cache: its geometry, its tensors and how many blocks of them the engine's budget holds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.config import Qwen2VLConfig
from model.engine.block_manager import blocks_needed
from model.parallel import SINGLE, TensorParallel

CPU_KV_CACHE_BYTES = 512 << 20  # the CPU's default budget; CUDA takes a fraction of free memory
CUDA_KV_CACHE_FRACTION = 0.8


@dataclass
class CacheShape:
    """Geometry of the KV cache of a decoder: layers x blocks x block_size x kv heads x head_dim."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int

    @classmethod
    def for_model(cls, config: Qwen2VLConfig, block_size: int, tp: TensorParallel = SINGLE) -> CacheShape:
        """The cache of one rank: the key/value heads its attention reads (all of them at size 1)."""
        _, (kv_lo, kv_hi) = tp.head_ranges(config.num_attention_heads, config.num_key_value_heads)
        return cls(config.num_hidden_layers, kv_hi - kv_lo, config.head_dim, block_size)

    def bytes_per_block(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


def allocate_kv_cache(
    shape: CacheShape, num_blocks: int, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V caches, each (layers, num_blocks, block_size, kv_heads, head_dim)."""
    size = (shape.num_layers, num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
    return torch.zeros(size, dtype=dtype, device=device), torch.zeros(size, dtype=dtype, device=device)


def num_kv_blocks(
    shape: CacheShape,
    dtype: torch.dtype,
    device: torch.device,
    max_tokens: int,
    cache_bytes: int | None = None,
    fraction: float | None = None,
) -> int:
    """Blocks that `cache_bytes`, else `fraction` of free GPU memory (CUDA) or the CPU default hold, never
    more than `max_tokens` need."""
    per_block = shape.bytes_per_block(dtype)
    if cache_bytes is not None:
        num = cache_bytes // per_block
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        num = int(free * (fraction or CUDA_KV_CACHE_FRACTION)) // per_block
    else:
        num = CPU_KV_CACHE_BYTES // per_block
    num = min(num, blocks_needed(max_tokens, shape.block_size))
    if num < 1:
        raise ValueError(
            f"the KV cache budget holds no block of {shape.block_size} tokens ({per_block} bytes); "
            "raise EngineConfig.kv_cache_bytes or kv_cache_fraction"
        )
    return num
