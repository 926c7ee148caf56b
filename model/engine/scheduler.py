"""Continuous-batching scheduler: which sequences compute how many tokens in the next step.

One step mixes decodes (one token each) and prefill chunks under a token budget, in that order, so running
sequences keep generating while long prompts are prefilled a chunk at a time. Waiting requests are admitted
first-come first-served while there is room (sequences, budget, and KV blocks for the whole prompt). When a
running sequence needs a block and none is free, the youngest running sequence is preempted: its blocks are
freed and it is recomputed from scratch later (cheaper than swapping for the short decodes we run).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from model.engine.block_manager import BlockManager
from model.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_batch_tokens: int):
        if max_num_seqs < 1 or max_batch_tokens < 1:
            raise ValueError(
                f"max_num_seqs and max_batch_tokens must be >= 1, got {max_num_seqs}, {max_batch_tokens}"
            )
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the first to be preempted

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        scheduled: set[int] = set()
        budget = self.max_batch_tokens

        def take(seq: Sequence, n: int) -> None:
            nonlocal budget
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            scheduled.add(id(seq))
            budget -= n

        # 1. decodes: one token each; a token that opens a new block may preempt the youngest.
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed != 1:
                continue
            # Most steps: the token fits the sequence's last block, and nothing can need preempting.
            if not self.blocks.missing_blocks(seq.block_table, seq.num_tokens):
                take(seq, 1)
                continue
            while not self.blocks.can_grow(seq.block_table, seq.num_tokens):
                victim = next(s for s in reversed(self.running) if id(s) not in scheduled)
                self.preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq.block_table, seq.num_tokens)
                take(seq, 1)

        # 2. prefills already under way: their blocks were taken at admission.
        for seq in self.running:
            if budget == 0:
                break
            if id(seq) not in scheduled and seq.num_uncomputed > 1:
                take(seq, min(seq.num_uncomputed, budget))

        # 3. admissions, unless memory was short this step.
        while self.waiting and budget > 0 and not batch.preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_grow(seq.block_table, seq.num_tokens):
                break
            self.blocks.grow(seq.block_table, seq.num_tokens)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            take(seq, min(seq.num_uncomputed, budget))
        return batch

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's cache and queue it first in line, to be recomputed."""
        self.running.remove(seq)
        self.blocks.free(seq.block_table)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.release_vision()
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """Retire a sequence and give its blocks back."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.finish(reason, error)

    def abort_all(self) -> None:
        """Drop every unfinished sequence and free its blocks (after a failed step)."""
        for seq in [*self.running, *self.waiting]:
            self.blocks.free(seq.block_table)
            seq.finish("error", "aborted: the engine step failed")
        self.running.clear()
        self.waiting.clear()
