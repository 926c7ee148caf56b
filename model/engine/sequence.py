"""State of one request inside the engine: its tokens, cache blocks, M-RoPE positions and vision inputs,
and the checks that turn a `Request` into one."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import torch

from model.config import Qwen2VLConfig
from model.engine.block_manager import BlockManager, blocks_needed
from model.engine.request import Request, RequestOutput
from model.rope import mrope_positions


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
    matcher: Any = None  # the llguidance matcher of a request decoding under a JSON schema
    timings: Timings = field(default_factory=lambda: Timings(arrival=time.perf_counter()))

    @classmethod
    def from_request(
        cls,
        index: int,
        req: Request,
        config: Qwen2VLConfig,
        max_model_len: int,
        blocks: BlockManager,
        has_tokenizer: bool,
    ) -> Sequence:
        """Validate a request and build its sequence; a ValueError says what is wrong with it."""
        ids = torch.as_tensor(req.prompt_token_ids).reshape(-1).tolist()
        if not ids:
            raise ValueError("empty prompt: give at least one token id")
        if len(ids) >= max_model_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens leaves no room to generate under "
                f"max_model_len={max_model_len}; "
                "use fewer frames or smaller images, or raise EngineConfig.max_model_len"
            )
        if req.sampling.stop and not has_tokenizer:
            raise ValueError(
                "stop strings need a tokenizer: pass tokenizer= to Engine or use Engine.from_pretrained"
            )
        if min(ids) < 0 or max(ids) >= config.vocab_size:
            raise ValueError(
                f"prompt token ids must lie in [0, {config.vocab_size}); tokenize with the model's tokenizer"
            )
        items: list[VisionItem] = []
        grids = {}
        for kind, pixels, grid, pad in (
            ("image", req.pixel_values, req.image_grid_thw, config.image_token_id),
            ("video", req.pixel_values_videos, req.video_grid_thw, config.video_token_id),
        ):
            grids[kind] = None
            num_pads = ids.count(pad)
            if pixels is None and grid is None:
                if num_pads:
                    raise ValueError(
                        f"the prompt has {num_pads} {kind} pad tokens but no {kind} inputs were given"
                    )
                continue
            if pixels is None or grid is None:
                raise ValueError(
                    f"{kind} inputs need both pixel values and grid_thw (the processor gives both)"
                )
            grid = torch.as_tensor(grid).reshape(-1, 3).long()
            items.extend(_vision_items(config, kind, pixels, grid, num_pads))
            grids[kind] = grid
        positions, delta = mrope_positions(ids, grids["image"], grids["video"], config)
        longest = min(len(ids) + req.sampling.max_new_tokens, max_model_len)
        if blocks_needed(longest, blocks.block_size) > blocks.num_blocks:
            raise ValueError(
                f"a request of up to {longest} tokens needs {blocks_needed(longest, blocks.block_size)} "
                f"KV blocks but the cache has {blocks.num_blocks}; raise the KV cache size or lower "
                "max_new_tokens"
            )
        num_visual = sum(it.num_patches for it in items) // config.vision.spatial_merge_size**2
        return cls(index, req, ids, len(ids), positions, delta, items, num_visual)

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

    def output(self) -> RequestOutput:
        """The finished sequence as the caller sees it; timings in seconds from its arrival."""
        t = self.timings

        def since(x: float | None) -> float:
            return (x - t.arrival) if x is not None else float("nan")

        return RequestOutput(
            index=self.index,
            text=self.text,
            token_ids=self.output_ids,
            finish_reason=self.finish_reason,
            error=self.error,
            num_prompt_tokens=self.prompt_len,
            num_visual_tokens=self.num_visual_tokens,
            num_generated_tokens=self.num_output_tokens,
            timings={
                "queued_s": since(t.first_scheduled),
                "first_token_s": since(t.first_token),
                "total_s": since(t.finished),
            },
            num_preemptions=self.num_preemptions,
            logprobs=self.logprobs if self.request.sampling.logprobs else None,
        )


def _vision_items(
    config: Qwen2VLConfig, kind: str, pixels: torch.Tensor, grid: torch.Tensor, num_pads: int
) -> list[VisionItem]:
    v = config.vision
    m = v.spatial_merge_size
    if bool((grid <= 0).any()) or bool((grid[:, 1:] % m).any()):
        raise ValueError(
            f"{kind}_grid_thw {grid.tolist()} is invalid: all positive, height and width "
            f"multiples of {m}; use the processor's grid"
        )
    sizes = grid.prod(-1).tolist()
    pixels = torch.as_tensor(pixels)
    if pixels.dim() == 3 and pixels.shape[0] == 1:
        pixels = pixels[0]
    if tuple(pixels.shape) != (sum(sizes), v.patch_dim):
        raise ValueError(
            f"{kind} pixel values of shape {tuple(pixels.shape)} do not match grid_thw "
            f"{grid.tolist()}, which needs ({sum(sizes)}, {v.patch_dim}); pass the processor's output"
        )
    if sum(sizes) // m**2 != num_pads:
        raise ValueError(
            f"the prompt has {num_pads} {kind} pad tokens but {kind}_grid_thw {grid.tolist()} "
            f"gives {sum(sizes) // m**2} tokens; build the prompt with the processor"
        )
    return [VisionItem(p, tuple(g), kind == "video") for p, g in zip(pixels.split(sizes), grid.tolist())]
