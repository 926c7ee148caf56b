"""Video windows: which frames each window of a video samples, and at what size, to fit the model's context.

Metadata only (nothing is decoded here): the decode stage and `vlbatch plan` both cut windows with these
functions, so a plan and a run agree window by window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from model.pixels import FRAME_FACTOR, IMAGE_FACTOR, sample_frame_indices, smart_resize, video_frame_size
from pipeline.budget import TokenBudget
from pipeline.decode.files import DecodeError
from schemas.jobs import (
    MAX_SOURCE_FRAMES,
    MAX_SOURCE_PIXELS,
    MAX_VIDEO_SECONDS,
    VIDEO_FPS,
    VIDEO_MAX_FRAMES,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_FRAMES,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    CaptionVideosJob,
)

# Job settings the context fit treats as floors when the user set them (defaults are lowered freely).
FIT_FLOORS = ("min_frames", "min_pixels")


@dataclass
class VideoDecodeConfig:
    """How frames are sampled and sized (the qwen-vl-utils rules) and what a video may cost at most."""

    fps: float = VIDEO_FPS
    min_frames: int = VIDEO_MIN_FRAMES
    max_frames: int = VIDEO_MAX_FRAMES  # per window
    min_pixels: int = VIDEO_MIN_PIXELS  # per frame
    max_pixels: int = VIDEO_MAX_PIXELS  # per frame
    total_pixels: int = VIDEO_TOTAL_PIXELS  # all sampled frames of one window
    clip_seconds: float | None = None
    max_video_seconds: float = MAX_VIDEO_SECONDS
    max_source_frames: int = MAX_SOURCE_FRAMES
    max_source_pixels: int = MAX_SOURCE_PIXELS
    threads: int = 0  # decoder threads; 0 lets the decoder choose
    backend: Literal["auto", "decord", "pyav"] = "auto"  # auto: decord only where it is frame-exact
    # The model's context: visual tokens one window may take (None: no fit), and the sentence that says why.
    max_visual_tokens: int | None = None
    budget_note: str = ""
    floors: tuple[str, ...] = ()  # of FIT_FLOORS: the ones the user set, which the fit must keep
    model_pixels: tuple[int, int] | None = None  # (min, max) pixels of the model's own resize

    @classmethod
    def from_job(
        cls,
        job: CaptionVideosJob,
        budget: TokenBudget | None = None,
        model_pixels: tuple[int, int] | None = None,
        **overrides: Any,
    ) -> VideoDecodeConfig:
        """The decode settings of a caption job; with `budget`, every window is fitted to the context."""
        values = dict(
            fps=job.fps,
            min_frames=job.min_frames,
            max_frames=job.max_frames,
            min_pixels=job.min_pixels,
            max_pixels=job.max_pixels,
            total_pixels=job.total_pixels,
            clip_seconds=job.clip_seconds,
            max_video_seconds=job.limits.max_video_seconds,
            max_source_frames=job.limits.max_frames,
            max_source_pixels=job.limits.max_pixels,
            # As many decoder threads as the actor has CPUs: left to choose, FFmpeg starts one per core of
            # the node in every decode actor, and a node full of actors thrashes.
            threads=max(1, math.ceil(job.resources.cpus_per_decode_worker)),
            floors=tuple(name for name in FIT_FLOORS if name in job.model_fields_set),
            model_pixels=model_pixels,
        )
        if budget is not None:
            values.update(max_visual_tokens=budget.visual_tokens, budget_note=budget.describe())
        return cls(**{**values, **overrides})


@dataclass
class VideoInfo:
    """What the container says about a video's first video stream, with the frame count made honest."""

    uri: str
    container: str
    codec: str
    width: int
    height: int
    fps: float
    frame_count: int  # demuxed packets when `counted`, else the header's claim or duration x fps
    duration_s: float
    counted: bool
    header_frame_count: int | None = None  # what the container claims, for comparison
    timestamps: list[float] | None = field(default=None, repr=False)  # per frame, when pts are trustworthy

    def timestamp(self, index: int) -> float:
        """Seconds from the first frame to frame `index` (index == frame_count: the end of the video)."""
        if self.timestamps is None:
            return index / self.fps
        if index >= len(self.timestamps):
            return self.timestamps[-1] + 1 / self.fps
        return self.timestamps[index]


@dataclass(frozen=True)
class Window:
    """Frames [start_frame, end_frame) of a video, of which `frame_indices` are sampled at height x width."""

    index: int
    start_frame: int
    end_frame: int
    frame_indices: tuple[int, ...]
    height: int
    width: int


def check_limits(info: VideoInfo, cfg: VideoDecodeConfig) -> None:
    """Raise DecodeError when a video is beyond the job's limits."""
    if info.duration_s > cfg.max_video_seconds:
        raise DecodeError(
            f"{info.uri}: lasts {info.duration_s:.0f} s, "
            f"over limits.max_video_seconds={cfg.max_video_seconds:g}"
        )
    if info.frame_count > cfg.max_source_frames:
        raise DecodeError(
            f"{info.uri}: has {info.frame_count} frames, over limits.max_frames={cfg.max_source_frames}"
        )
    if info.width * info.height > cfg.max_source_pixels:
        raise DecodeError(
            f"{info.uri}: frames of {info.width}x{info.height} "
            f"exceed limits.max_pixels={cfg.max_source_pixels}"
        )


def frame_size(height: int, width: int, n_frames: int, cfg: VideoDecodeConfig, total_pixels=None):
    """(height, width) of each sampled frame: qwen-vl-utils' per-frame budget under the window's total,
    then the model's own resize bounds.

    Frames are resized here, on the CPU workers, to this final size (`resize_video_frames`), so the
    model-side processor's resize is a no-op and only uint8 pixels of the final size travel on.
    """
    total = cfg.total_pixels if total_pixels is None else total_pixels
    size = video_frame_size(height, width, n_frames, cfg.min_pixels, cfg.max_pixels, total)
    if cfg.model_pixels is not None:
        size = smart_resize(*size, IMAGE_FACTOR, *cfg.model_pixels)
    return size


def video_tokens(n_frames: int, height: int, width: int) -> int:
    """Visual tokens of `n_frames` frames of height x width (multiples of 28): one per 2x28x28 patch."""
    return -(-n_frames // FRAME_FACTOR) * (height // IMAGE_FACTOR) * (width // IMAGE_FACTOR)


def fit_window(info: VideoInfo, cfg: VideoDecodeConfig, start: int, count: int) -> tuple[list[int], int, int]:
    """(source frame indices, height, width) of frames [start, start + count): the reference sampling, fitted
    to the model's context.

    Where the reference rules would overflow `cfg.max_visual_tokens`, frames are first made smaller (as
    total_pixels does, down to min_pixels), then fewer (an even count, evenly spread). A window of one frame
    shows it twice, as the model takes a still. Raises DecodeError when the user's own floors cannot fit.
    """
    if count == 1:
        picks = [start] * FRAME_FACTOR
    else:
        picks = sample_frame_indices(
            count, info.fps, cfg.fps, cfg.min_frames, cfg.max_frames, first_frame=start
        )
    height, width = frame_size(info.height, info.width, len(picks), cfg)
    budget = cfg.max_visual_tokens
    if budget is None or video_tokens(len(picks), height, width) <= budget:
        return picks, height, width
    total = min(cfg.total_pixels, max(budget, 1) * IMAGE_FACTOR**2)  # total_pixels counts tokens x 28 x 28
    floor = FRAME_FACTOR
    if "min_frames" in cfg.floors:  # a floor, but never above what the window has to give
        floor = max(floor, min(len(picks), -(-cfg.min_frames // FRAME_FACTOR) * FRAME_FACTOR))
    smallest = frame_size(info.height, info.width, 1 << 30, cfg, total)  # every frame at min_pixels
    pair = video_tokens(FRAME_FACTOR, *smallest)
    n = min(len(picks), max(floor, budget // pair * FRAME_FACTOR))
    while n >= floor:
        height, width = frame_size(info.height, info.width, n, cfg, total)
        if video_tokens(n, height, width) <= budget:
            if n < len(picks):
                picks = sample_frame_indices(
                    count, info.fps, cfg.fps, min(cfg.min_frames, n), n, first_frame=start
                )
            return picks, height, width
        n -= FRAME_FACTOR
    raise DecodeError(f"{info.uri}: {_fit_advice(cfg, budget, floor, pair)}")


def _fit_advice(cfg: VideoDecodeConfig, budget: int, floor: int, pair: int) -> str:
    """What to change when even the floors overflow: the settings and values that would fit."""
    need = floor // FRAME_FACTOR * pair
    options = []
    if "min_frames" in cfg.floors and budget >= pair:
        options.append(f"min_frames to at most {budget // pair * FRAME_FACTOR}")
    if "min_pixels" in cfg.floors and budget >= floor // FRAME_FACTOR:
        per_frame = budget // (floor // FRAME_FACTOR) * IMAGE_FACTOR**2
        options.append(f"min_pixels to at most {int(per_frame / 1.05)}")  # frames may take 5% more
    if not options:
        options.append(f"sampling.max_new_tokens lower by at least {need - budget:,}, or raise max_model_len")
    return (
        f"{floor} frames of at least min_pixels={cfg.min_pixels} take {need:,} visual tokens, but "
        f"{cfg.budget_note}; set {' or '.join(options)}"
    )


def plan_windows(
    info: VideoInfo, cfg: VideoDecodeConfig, start_frame: int = 0, first_index: int = 0
) -> list[Window]:
    """Cut frames [start_frame, frame_count) into windows of `clip_seconds` and sample each one.

    A tail shorter than `min_frames` joins the window before it.
    """
    total = info.frame_count
    length = max(FRAME_FACTOR, round(cfg.clip_seconds * info.fps)) if cfg.clip_seconds else total
    bounds = [[s, min(s + length, total)] for s in range(start_frame, total, length)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < cfg.min_frames:
        bounds[-1][1] = bounds.pop()[1]  # the pop runs first: [-1] is then the window before the tail
    windows = []
    for k, (start, end) in enumerate(bounds):
        try:
            picks, height, width = fit_window(info, cfg, start, end - start)
        except ValueError as e:
            raise DecodeError(str(e) if info.uri in str(e) else f"{info.uri}: {e}") from e
        windows.append(Window(first_index + k, start, end, tuple(picks), height, width))
    return windows
