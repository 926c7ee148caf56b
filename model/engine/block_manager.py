"""Free list of KV cache blocks and the block tables that hand them to sequences.

Paged blocks rather than one slot of max_model_len per sequence: prompts here range from a few dozen
tokens (a receipt) to tens of thousands (a long video). Fixed slots would reserve the worst case for every
sequence and fit only a handful at once; blocks of `block_size` tokens let a sequence hold only what it
uses, so many short requests share the pool while a long one grows, and a finished sequence's blocks go
straight to the next one.
"""

from __future__ import annotations

from collections import deque


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    """Free list of cache blocks; a sequence's block table lists the blocks that hold its tokens in order."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV cache needs >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def missing_blocks(self, block_table: list[int], num_tokens: int) -> int:
        """Blocks a table must gain to hold `num_tokens` tokens."""
        return max(0, blocks_needed(num_tokens, self.block_size) - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.missing_blocks(block_table, num_tokens) <= self.num_free

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Extend `block_table` in place so it holds `num_tokens` tokens."""
        missing = self.missing_blocks(block_table, num_tokens)
        if missing > self.num_free:
            raise RuntimeError(f"KV cache out of blocks: need {missing}, {self.num_free} free")
        block_table.extend(self.free_blocks.popleft() for _ in range(missing))

    def free(self, block_table: list[int]) -> None:
        """Return a table's blocks to the pool and empty it."""
        self.free_blocks.extend(block_table)
        block_table.clear()

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Flat cache slot (block * block_size + offset) of each token position in [start, end)."""
        bs = self.block_size
        return [block_table[i // bs] * bs + i % bs for i in range(start, end)]
