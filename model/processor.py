"""Qwen2-VL preprocessing: resize rules, frame sampling, pixel patches, and the Processor that turns chat
messages into model inputs.

References, matched exactly:
- pixels, patch order and grids: `transformers` 4.57.6 `Qwen2VLImageProcessor` (PIL bicubic resize to the
  `smart_resize` size, x/255 in float64, float32 normalize, a still image doubled to 2 frames);
- sampled video frames: resized as transformers 4.57.6 `Qwen2VLVideoProcessor` does on CPU (torchvision's
  tensor resize, which for uint8 runs torch's antialiased bicubic in uint8), batched over the frames;
- video frame count, frame indices and per-frame pixel budget: `qwen-vl-utils` 0.0.14, the official
  Qwen2-VL input pipeline (`smart_nframes`, `torch.linspace(...).round()`, `fetch_video`'s budget).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.chat import item_kind, render_chat
from model.tokenizer import Tokenizer

IMAGE_FACTOR = 28  # patch 14 x merge 2: every side must be a multiple of this
FRAME_FACTOR = 2  # temporal patch: frames come in pairs
MAX_RATIO = 200

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# qwen-vl-utils 0.0.14 video defaults. Pixel budgets are counted in merged tokens of factor x factor pixels.
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768
VIDEO_MIN_TOKENS = 128  # per frame
VIDEO_MAX_TOKENS = 768  # per frame
VIDEO_SEQ_LEN = 128000  # MODEL_SEQ_LEN: 90% of it may go to the frames of one video


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


@dataclass
class ImageProcessor:
    """Qwen2-VL pixel preprocessing, configured like `preprocessor_config.json`."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    _table: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "preprocessor_config.json") -> ImageProcessor:
        """Read a preprocessor_config.json dict; bounds from min/max_pixels, else from size."""
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if cfg.get(flag, True) is not True:
                raise ValueError(f"{source}: {flag}=false is not supported; Qwen2-VL checkpoints set it true")
        size = cfg.get("size") or {}
        kwargs = {
            "min_pixels": cfg.get("min_pixels", size.get("shortest_edge")),
            "max_pixels": cfg.get("max_pixels", size.get("longest_edge")),
            **{k: cfg.get(k) for k in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor")},
            "image_mean": tuple(cfg["image_mean"]) if "image_mean" in cfg else None,
            "image_std": tuple(cfg["image_std"]) if "image_std" in cfg else None,
        }
        proc = cls(**{k: v for k, v in kwargs.items() if v is not None})
        if proc.max_pixels < proc.min_pixels:
            raise ValueError(f"{source}: max_pixels {proc.max_pixels} is below min_pixels {proc.min_pixels}")
        return proc

    @classmethod
    def from_file(cls, path: str | Path) -> ImageProcessor:
        path = Path(path)
        if path.is_dir():
            path = path / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: missing; a Qwen2-VL checkpoint ships a preprocessor_config.json"
            )
        return cls.from_dict(json.loads(path.read_text()), str(path))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized_size(
        self, height: int, width: int, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> tuple[int, int]:
        """(h, w) an image or frame of height x width is resized to."""
        lo = self.min_pixels if min_pixels is None else min_pixels
        hi = self.max_pixels if max_pixels is None else max_pixels
        return smart_resize(height, width, self.factor, lo, hi)

    def grid_thw(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Patch grid of `num_frames` frames of height x width (before resizing); an image is 1 frame."""
        h, w = self.resized_size(height, width)
        return -(-num_frames // self.temporal_patch_size), h // self.patch_size, w // self.patch_size

    def num_tokens(self, grid_thw: Sequence[int]) -> int:
        """LLM tokens of a grid: patches merged merge_size x merge_size."""
        t, h, w = grid_thw
        return t * h * w // self.merge_size**2

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The normalization lookup table (cached), on `device`."""
        if self._table is None:
            self._table = normalize_table(self.image_mean, self.image_std, self.rescale_factor)
        return self._table.to(device)

    def patchify(self, frames: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 frames [T, H, W, 3] already at their final size -> (pixel_values, grid_thw (1, 3))."""
        frames = torch.as_tensor(frames)
        return patchify(
            frames,
            self.patch_size,
            self.temporal_patch_size,
            self.merge_size,
            table=self.table(frames.device),
        )

    def resize_image(self, image: Any) -> np.ndarray:
        """PIL image or uint8 [H, W, 3] -> uint8 [h, w, 3] at the size the model sees."""
        array = to_rgb_array(image)
        return resize_frames([array], *self.resized_size(*array.shape[:2]))[0]

    def resize_video(self, frames: Any) -> np.ndarray:
        """uint8 frames [T, H, W, 3] -> [T, h, w, 3], every frame sized by the first one's shape."""
        if len(frames) == 0:
            raise ValueError("a video needs at least one frame")
        first = to_rgb_array(frames[0])
        return resize_frames(frames, *self.resized_size(*first.shape[:2]))

    def preprocess_image(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """One image -> (pixel_values (patches, 1176) float32, grid_thw (1, 3)); it counts as 2 frames."""
        return self.patchify(self.resize_image(image)[None])

    def preprocess_video(self, frames: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames the model should see, uint8 [T, H, W, 3] -> (pixel_values, grid_thw (1, 3))."""
        return self.patchify(self.resize_video(frames))


@dataclass
class VideoSampling:
    """How raw video frames become model frames (qwen-vl-utils 0.0.14 defaults); items may override any."""

    sample_fps: float = VIDEO_FPS
    min_frames: int = VIDEO_MIN_FRAMES
    max_frames: int = VIDEO_MAX_FRAMES
    min_pixels: int | None = None  # per frame; None: 128 tokens
    max_pixels: int | None = None  # per frame; None: 768 tokens, lowered by total_pixels
    total_pixels: float | None = None  # all frames; None: 90% of 128k tokens

    def with_overrides(self, item: dict) -> VideoSampling:
        changes = {f.name: item[f.name] for f in fields(self) if f.name in item}
        return VideoSampling(**{**self.__dict__, **changes})


@dataclass(frozen=True)
class VisionTokenIds:
    image_pad: int
    video_pad: int
    vision_start: int
    vision_end: int


@dataclass
class Prompt:
    """Token ids of a conversation with every pad expanded, and the grids they stand for (no pixels)."""

    input_ids: list[int]
    image_grid_thw: list[tuple[int, int, int]]
    video_grid_thw: list[tuple[int, int, int]]
    visual_tokens: int

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def text_tokens(self) -> int:
        return len(self.input_ids) - self.visual_tokens


class Processor:
    """Chat messages with images and videos -> Qwen2-VL inputs (input_ids, pixel values, grids).

    Content items: {"type": "text", "text": str}; {"type": "image", "image": PIL or uint8 [H, W, 3]};
    {"type": "video", "video": uint8 [T, H, W, 3] or a list of frames, "fps": float}. With "fps" the frames
    are the decoded video at that rate and are sampled and resized as the official pipeline does (item keys
    sample_fps, min_frames, max_frames, min_pixels, max_pixels, total_pixels override `VideoSampling`);
    without "fps" they are the frames the model sees, as is. For counting only, an image may be given as
    "height"/"width" and a video as "num_frames"/"height"/"width" (+ "fps") instead of pixels.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor,
        token_ids: VisionTokenIds,
        video: VideoSampling | None = None,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.token_ids = token_ids
        self.video = video or VideoSampling()

    @classmethod
    def from_pretrained(cls, path: str | Path, video: VideoSampling | None = None) -> Processor:
        """Load from a checkpoint directory: preprocessor_config.json, tokenizer.json, config.json."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a directory; point at a Qwen2-VL checkpoint directory")
        tokenizer = Tokenizer.from_file(path / "tokenizer.json")
        image_processor = ImageProcessor.from_file(path / "preprocessor_config.json")
        config_path = path / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        ids = {}
        for name, key, text in (
            ("image_pad", "image_token_id", "<|image_pad|>"),
            ("video_pad", "video_token_id", "<|video_pad|>"),
            ("vision_start", "vision_start_token_id", "<|vision_start|>"),
            ("vision_end", "vision_end_token_id", "<|vision_end|>"),
        ):
            ids[name] = tokenizer.token_id(text)
            if config.get(key, ids[name]) != ids[name]:
                raise ValueError(
                    f"{config_path}: {key}={config[key]} but {tokenizer.source} gives {text} id {ids[name]}; "
                    "the config and tokenizer belong to different checkpoints"
                )
        return cls(tokenizer, image_processor, VisionTokenIds(**ids), video)

    # -- shapes, without pixels ------------------------------------------------------------------------

    def video_plan(
        self, num_frames: int, height: int, width: int, fps: float | None, item: dict | None = None
    ) -> tuple[list[int] | None, tuple[int, int]]:
        """Which frames of a video the model sees (None: all, as given) and the size they are resized to."""
        if fps is None:
            return None, self.image_processor.resized_size(height, width)
        s = self.video.with_overrides(item or {})
        indices = sample_frame_indices(num_frames, fps, s.sample_fps, s.min_frames, s.max_frames)
        size = video_frame_size(
            height,
            width,
            len(indices),
            s.min_pixels,
            s.max_pixels,
            s.total_pixels,
            self.image_processor.factor,
        )
        # The model-side processor resizes once more under its own bounds: a no-op for sizes already on
        # the grid and inside its bounds, applied anyway so both steps of the reference are kept.
        return indices, self.image_processor.resized_size(*size)

    def _grid(self, item: dict) -> tuple[int, int, int]:
        kind, ip = item_kind(item), self.image_processor
        if kind == "image":
            image = item.get("image", item.get("image_url"))
            if image is None:
                h, w = item["height"], item["width"]
            elif isinstance(image, Image.Image):
                w, h = image.size
            elif isinstance(image, np.ndarray | torch.Tensor):
                h, w = image.shape[:2]
            else:
                raise ValueError(f"image items need a PIL image or a uint8 array; load {image!r} first")
            return ip.grid_thw(1, h, w)
        frames = item.get("video")
        if frames is None:
            t, h, w = item["num_frames"], item["height"], item["width"]
        elif isinstance(frames, str):
            raise ValueError(f"video items need decoded frames, uint8 [T, H, W, 3]; decode {frames!r} first")
        else:
            first = frames[0]
            t = len(frames)
            h, w = (first.size[1], first.size[0]) if isinstance(first, Image.Image) else first.shape[:2]
        indices, (rh, rw) = self.video_plan(t, h, w, item.get("fps"), item)
        n = t if indices is None else len(indices)
        return -(-n // ip.temporal_patch_size), rh // ip.patch_size, rw // ip.patch_size

    def encode_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> Prompt:
        """Token ids and grids of a conversation without computing pixels (the pipeline's prepare step)."""
        grids = {"image": [], "video": []}
        for message in messages:
            if isinstance(message["content"], list | tuple):
                for item in message["content"]:
                    kind = item_kind(item)
                    if kind in grids:
                        grids[kind].append(self._grid(item))
        ids = self.tokenizer.encode(render_chat(messages, add_generation_prompt))
        pads = {
            self.token_ids.image_pad: iter(grids["image"]),
            self.token_ids.video_pad: iter(grids["video"]),
        }
        counts = {pad: 0 for pad in pads}
        # Special tokens split text before BPE: expanding pads after encoding equals encoding expanded text.
        out, visual = [], 0
        for token in ids:
            if token not in pads:
                out.append(token)
                continue
            grid = next(pads[token], None)
            counts[token] += 1
            if grid is None:
                raise ValueError(
                    "the message text contains <|image_pad|> or <|video_pad|>; remove it from the text"
                )
            n = self.image_processor.num_tokens(grid)
            out.extend([token] * n)
            visual += n
        if counts[self.token_ids.image_pad] != len(grids["image"]) or counts[self.token_ids.video_pad] != len(
            grids["video"]
        ):
            raise ValueError("the tokenizer did not keep one pad token per image/video; is it Qwen2-VL's?")
        return Prompt(out, grids["image"], grids["video"], visual)

    def count_tokens(self, messages: list[dict], add_generation_prompt: bool = True) -> Prompt:
        """Exact prompt length and visual token count of a conversation; pixels are never touched."""
        return self.encode_prompt(messages, add_generation_prompt)

    # -- pixels ----------------------------------------------------------------------------------------

    def prepare_video(self, frames: Any, fps: float | None, item: dict | None = None) -> np.ndarray:
        """uint8 frames the model sees: sampled and resized when `fps` is given, else resized only.

        Sampled frames are resized as the decode stage resizes them (`resize_video_frames`); frames given
        without `fps` go through the image processor's resize, as transformers' image processor does.
        """
        if len(frames) == 0:
            raise ValueError("a video needs at least one frame")
        first = to_rgb_array(frames[0])
        indices, (h, w) = self.video_plan(len(frames), *first.shape[:2], fps, item)
        if indices is None:
            return resize_frames(frames, h, w)
        return resize_video_frames(np.stack([to_rgb_array(frames[i]) for i in indices]), h, w)

    def __call__(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> dict[str, torch.Tensor | None]:
        """input_ids (1, S), pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw (or None)."""
        prompt = self.encode_prompt(messages, add_generation_prompt)
        images, videos = [], []
        for message in messages:
            if not isinstance(message["content"], list | tuple):
                continue
            for item in message["content"]:
                kind = item_kind(item)
                if kind == "image":
                    if "image" not in item:
                        raise ValueError("image items need pixels under 'image' (PIL or uint8 [H, W, 3])")
                    images.append(self.image_processor.preprocess_image(item["image"]))
                elif kind == "video":
                    if "video" not in item:
                        raise ValueError("video items need frames under 'video' (uint8 [T, H, W, 3])")
                    frames = self.prepare_video(item["video"], item.get("fps"), item)
                    videos.append(self.image_processor.patchify(frames))

        def cat(parts: list, i: int) -> torch.Tensor | None:
            return torch.cat([p[i] for p in parts]) if parts else None

        return {
            "input_ids": torch.tensor([prompt.input_ids], dtype=torch.long),
            "pixel_values": cat(images, 0),
            "image_grid_thw": cat(images, 1),
            "pixel_values_videos": cat(videos, 0),
            "video_grid_thw": cat(videos, 1),
        }
