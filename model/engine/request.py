"""What goes into the engine (a prompt, its vision inputs, how to sample) and what comes out of it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from model.engine.sampling import SamplingParams


@dataclass
class Request:
    """A prompt's token ids, the processor's vision inputs for it (batch dim 1 allowed) and how to sample."""

    prompt_token_ids: Sequence[int] | torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)

    @classmethod
    def from_inputs(cls, inputs: dict, sampling: SamplingParams | None = None) -> Request:
        """From the dict `Processor.__call__` returns (input_ids (1, S), pixel_values, grids, ...)."""
        return cls(
            prompt_token_ids=torch.as_tensor(inputs["input_ids"]).reshape(-1).tolist(),
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            pixel_values_videos=inputs.get("pixel_values_videos"),
            video_grid_thw=inputs.get("video_grid_thw"),
            sampling=sampling or SamplingParams(),
        )


@dataclass
class RequestOutput:
    """What became of one request. finish_reason: 'stop', 'length' or 'error' (then `error` says why)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    error: str | None
    num_prompt_tokens: int
    num_visual_tokens: int
    num_generated_tokens: int
    # seconds from add_request: queued_s until first scheduled, first_token_s, total_s until finished
    timings: dict[str, float]
    num_preemptions: int = 0
    logprobs: list[dict[int, float]] | None = None

    @classmethod
    def failed(cls, index: int, req: Request, message: str) -> RequestOutput:
        """The output of a request refused before it reached the scheduler."""
        return cls(
            index=index,
            text="",
            token_ids=[],
            finish_reason="error",
            error=message,
            num_prompt_tokens=len(torch.as_tensor(req.prompt_token_ids).reshape(-1)),
            num_visual_tokens=0,
            num_generated_tokens=0,
            timings={"queued_s": 0.0, "first_token_s": float("nan"), "total_s": 0.0},
        )
