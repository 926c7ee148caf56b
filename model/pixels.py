"""From images and video frames to the model's pixels: the reference's size, frame-sampling, resize and patch
rules, as plain functions (the configured classes that apply them are in model/processor.py).

References, matched exactly:
- pixels, patch order and grids: `transformers` 4.57.6 `Qwen2VLImageProcessor` (PIL bicubic resize to the
  `smart_resize` size, x/255 in float64, float32 normalize, a still image doubled to 2 frames);
- sampled video frames: resized as transformers 4.57.6 `Qwen2VLVideoProcessor` does on CPU (torchvision's
  tensor resize, which for uint8 runs torch's antialiased bicubic in uint8), batched over the frames;
- video frame count, frame indices and per-frame pixel budget: `qwen-vl-utils` 0.0.14, the official
  Qwen2-VL input pipeline (`smart_nframes`, `torch.linspace(...).round()`, `fetch_video`'s budget), whose
  default numbers schemas/jobs.py owns (a job's defaults are the reference's).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from schemas.jobs import (
    VIDEO_FPS,
    VIDEO_MAX_FRAMES,
    VIDEO_MAX_TOKENS,
    VIDEO_MIN_FRAMES,
    VIDEO_MIN_TOKENS,
    VIDEO_SEQ_LEN,
)

IMAGE_FACTOR = 28  # patch 14 x merge 2: every side must be a multiple of this
FRAME_FACTOR = 2  # temporal patch: frames come in pairs
MAX_RATIO = 200

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """Nearest (h, w), multiples of `factor`, whose area lies in [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(
            f"aspect ratio of {width}x{height} exceeds {MAX_RATIO}; crop or pad the image before captioning"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def num_sampled_frames(
    total_frames: int,
    video_fps: float,
    fps: float = VIDEO_FPS,
    min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
) -> int:
    """Frames the reference samples from a video: `fps` per second, clamped, rounded down to pairs."""
    min_frames = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(min(max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    n = total_frames / video_fps * fps
    n = min(max(n, min_frames), max_frames, total_frames)
    n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(
            f"cannot sample {n} frames from a video of {total_frames} frames: the model needs at least "
            f"{FRAME_FACTOR}; pass a single frame as an image instead"
        )
    return n


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    fps: float = VIDEO_FPS,
    min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
    *,
    first_frame: int = 0,
) -> list[int]:
    """Indices of the frames the reference samples: evenly spaced over the whole video, ends included.

    `first_frame` offsets a window (frames first_frame .. first_frame + total_frames - 1) the way the
    reference does: the spacing is computed between the window's ends, not shifted afterwards.
    """
    n = num_sampled_frames(total_frames, video_fps, fps, min_frames, max_frames)
    # The reference rounds a float32 linspace (half to even); in float32, long videos land on other frames
    # than exact double arithmetic would pick, so use the same op rather than Python floats.
    return torch.linspace(first_frame, first_frame + total_frames - 1, n).round().long().tolist()


def frame_range(
    total_frames: int, video_fps: float, start_s: float | None = None, end_s: float | None = None
) -> tuple[int, int, int]:
    """First frame, last frame and frame count of the [start_s, end_s] window of a video (qwen-vl-utils)."""
    if video_fps <= 0 or total_frames <= 0:
        raise ValueError(
            f"a video needs a positive fps and frame count, got {video_fps} fps, {total_frames} frames"
        )
    if start_s is None and end_s is None:
        return 0, total_frames - 1, total_frames
    duration = total_frames / video_fps
    first = 0 if start_s is None else math.ceil(max(0.0, min(start_s, duration)) * video_fps)
    last = total_frames - 1
    if end_s is not None:
        last = min(math.floor(max(0.0, min(end_s, duration)) * video_fps), total_frames - 1)
    if first >= last:
        raise ValueError(
            f"empty video window {start_s}..{end_s} s of a {duration:.2f} s video: start it before its end"
        )
    return first, last, last - first + 1


def _fetch_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: float
) -> tuple[int, int]:
    """qwen-vl-utils' own smart_resize: like `smart_resize`, but sides start at one factor at least and the
    shrink branch has no floor; the two agree except on degenerate sizes."""
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels {max_pixels} is below min_pixels {min_pixels}; raise max_pixels")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(
            f"aspect ratio of {width}x{height} exceeds {MAX_RATIO}; crop or pad the video before captioning"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_frame_size(
    height: int,
    width: int,
    nframes: int,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: float | None = None,
    factor: int = IMAGE_FACTOR,
) -> tuple[int, int]:
    """(h, w) every sampled frame of a video is resized to, under qwen-vl-utils 0.0.14's pixel budget.

    Each frame gets at least `min_pixels` (default 128 tokens) and at most the smaller of 768 tokens and its
    share of `total_pixels` (default 90% of 128k tokens over all frames, counted per frame pair), but never
    less than 1.05 x min_pixels. A caller's `max_pixels` can lower that cap, never raise it.
    """
    min_pixels = VIDEO_MIN_TOKENS * factor * factor if min_pixels is None else min_pixels
    total_pixels = VIDEO_SEQ_LEN * factor * factor * 0.9 if total_pixels is None else total_pixels
    cap = max(
        min(VIDEO_MAX_TOKENS * factor * factor, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05)
    )
    cap = cap if max_pixels is None else min(max_pixels, cap)
    return _fetch_resize(height, width, factor, min_pixels, cap)


def normalize_table(
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    rescale_factor: float = 1 / 255,
) -> torch.Tensor:
    """(channels, 256) float32: the normalized value of every uint8 level, in the reference's arithmetic.

    The reference rescales in float64, casts to float32, then subtracts and divides in float32; a lookup
    table reproduces that bit for bit on any device, and keeps pixels uint8 until the last step.
    """
    levels = (torch.arange(256, dtype=torch.float64) * rescale_factor).to(torch.float32)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None]
    return (levels[None, :] - mean_t) / std_t


def patchify(
    frames: torch.Tensor | np.ndarray,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    rescale_factor: float = 1 / 255,
    table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 frames [T, H, W, C] at final size -> (pixel_values (patches, C*2*14*14) float32, grid (1, 3)).

    Runs on the frames' device. Patches come in (t, row window, col window, row, col) order, each patch
    flattened as (C, T, 14, 14); an odd frame count repeats the last frame. `table` may be a cached
    `normalize_table` on the frames' device.
    """
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4:
        raise ValueError(
            f"patchify takes uint8 frames [T, H, W, C], got {frames.dtype} {tuple(frames.shape)}"
        )
    t, h, w, c = frames.shape
    side = patch_size * merge_size
    if h % side or w % side or t == 0:
        raise ValueError(
            f"frames of {h}x{w} are not multiples of {side}; resize them with smart_resize first"
        )
    if t % temporal_patch_size:
        pad = temporal_patch_size - t % temporal_patch_size
        frames = torch.cat([frames, frames[-1:].expand(pad, h, w, c)])
    grid_t, grid_h, grid_w = frames.shape[0] // temporal_patch_size, h // patch_size, w // patch_size
    m, p = merge_size, patch_size
    x = frames.reshape(grid_t, temporal_patch_size, grid_h // m, m, p, grid_w // m, m, p, c)
    # -> (t, row window, col window, row in window, col in window, channel, frame in pair, y, x)
    x = x.permute(0, 2, 5, 3, 6, 8, 1, 4, 7).reshape(grid_t * grid_h * grid_w, -1)
    if table is None:
        table = normalize_table(mean, std, rescale_factor)
    table = table.to(frames.device)
    # Each column belongs to one channel; index a flat table with level + 256 * channel.
    channel_offset = torch.arange(c, device=frames.device, dtype=torch.int32).repeat_interleave(
        x.shape[1] // c
    )
    index = x.to(torch.int32) + channel_offset * 256
    pixel_values = table.reshape(-1).index_select(0, index.reshape(-1)).reshape(x.shape)
    return pixel_values, torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.long)


def to_rgb_array(image: Any) -> np.ndarray:
    """PIL image or uint8 array [H, W, 3] (or [H, W] grey) -> contiguous uint8 [H, W, 3]."""
    if isinstance(image, Image.Image):
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255), got {array.dtype}; convert with .astype(np.uint8)")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"images must be [H, W, 3] RGB (channels last), got shape {array.shape}")
    return np.ascontiguousarray(array)


def resize_frames(frames: Any, height: int, width: int) -> np.ndarray:
    """uint8 frames [T, H, W, 3] (or a list of images) -> [T, height, width, 3], PIL bicubic per frame."""
    arrays = [to_rgb_array(f) for f in frames]
    out = np.empty((len(arrays), height, width, 3), dtype=np.uint8)
    for i, a in enumerate(arrays):
        if a.shape[:2] == (height, width):
            out[i] = a  # PIL returns an exact copy at the same size
        else:
            out[i] = np.asarray(Image.fromarray(a).resize((width, height), Image.Resampling.BICUBIC))
    return out


def resize_video_frames(
    frames: np.ndarray | torch.Tensor, height: int, width: int, out: np.ndarray | None = None
) -> np.ndarray:
    """uint8 frames [T, H, W, 3] -> [T, height, width, 3], antialiased bicubic, all frames in one call.

    The same arithmetic as torchvision's tensor resize of uint8 frames on CPU, which is what transformers'
    Qwen2VLVideoProcessor runs: torch's separable bicubic (a = -0.5, PIL's filter) in fixed-point uint8, not
    float. Frames already of that size come back as they are, as torchvision returns them. With `out` (a
    C-contiguous uint8 [T, height, width, 3] array) the frames are written there and `out` is returned.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only arrays (from PIL): only read here
        x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[3] != 3:
        raise ValueError(
            f"video frames must be uint8 [T, H, W, 3] RGB, got {x.dtype} {tuple(x.shape)}; "
            "decode to rgb24 and stack the frames"
        )
    if out is not None and (out.shape != (x.shape[0], height, width, 3) or not out.flags.c_contiguous):
        raise ValueError(
            f"out must be C-contiguous of shape {(x.shape[0], height, width, 3)}, not {out.shape}"
        )
    if tuple(x.shape[1:3]) == (height, width):
        return _deliver(x.numpy(), out)
    # [T, H, W, C] seen as [T, C, H, W] is channels-last, the layout torch's fast uint8 kernel works in, and
    # its output comes back channels-last too: [T, h, w, C] again, without a copy.
    source = x.permute(0, 3, 1, 2)
    if out is not None:
        target = torch.from_numpy(out).permute(0, 3, 1, 2)
        try:  # the kernel interpolate calls, writing straight into `out` (channels-last as it wants)
            torch._C._nn._upsample_bicubic2d_aa(source, [height, width], False, None, None, out=target)
            if target.data_ptr() == out.ctypes.data:
                return out
        except (AttributeError, TypeError, RuntimeError):
            pass  # another torch: the public call and one copy
    y = torch.nn.functional.interpolate(
        source, size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    return _deliver(y.permute(0, 2, 3, 1).numpy(), out)


def _deliver(frames: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """`frames` C-contiguous (no copy if they are), or copied into `out`."""
    if out is None:
        return np.ascontiguousarray(frames)
    np.copyto(out, frames)
    return out
