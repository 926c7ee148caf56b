"""State of one request inside the engine: its tokens, cache blocks, M-RoPE positions and vision inputs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from model.engine import Request


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class VisionItem:
    """One image, or a run of temporal slices of one video, as the vision tower takes it."""

    pixel_values: torch.Tensor  # (t * h * w, C * temporal_patch * patch * patch)
    grid_thw: tuple[int, int, int]
    is_video: bool

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w


@dataclass
class Timings:
    """Wall-clock instants (time.perf_counter) of one request's life in the engine."""

    arrival: float = 0.0
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


@dataclass
class Sequence:
    """A request being served: prompt + generated token ids and how many of them the KV cache holds."""

    index: int  # position in the caller's request list
    request: Request
    token_ids: list[int]
    prompt_len: int
    positions: torch.Tensor  # (3, prompt_len) M-RoPE positions of the prompt
    rope_delta: int  # generated token i sits at position i + rope_delta on all three axes
    vision_items: list[VisionItem] = field(default_factory=list)
    num_visual_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    # Vision embeddings, computed when the prefill starts and dropped when it ends: chunks slice them.
    vision_embeds: torch.Tensor | None = None
    vision_slots: torch.Tensor | None = None  # prompt index of each row of vision_embeds, ascending
    finish_reason: str | None = None
    error: str | None = None
    text: str = ""
    logprobs: list[dict[int, float]] = field(default_factory=list)
    num_preemptions: int = 0
    timings: Timings = field(default_factory=lambda: Timings(arrival=time.perf_counter()))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def needs_vision(self) -> bool:
        """True when a prefill that still has vision tokens ahead lacks their embeddings."""
        return bool(self.vision_items) and self.vision_embeds is None and self.num_computed < self.prompt_len

    def position_ids(self, start: int, end: int) -> torch.Tensor:
        """(3, end - start) M-RoPE positions of tokens [start, end)."""
        prompt_end = min(end, self.prompt_len)
        parts = []
        if start < prompt_end:
            parts.append(self.positions[:, start:prompt_end])
        gen_start = max(start, self.prompt_len)
        if gen_start < end:
            text = torch.arange(gen_start, end, dtype=torch.long) + self.rope_delta
            parts.append(text.unsqueeze(0).expand(3, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def release_vision(self) -> None:
        self.vision_embeds = None
        self.vision_slots = None

    def finish(self, reason: str, error: str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error
        self.release_vision()
        self.timings.finished = time.perf_counter()
