"""The Processor: chat messages with images and videos -> Qwen2-VL inputs (input_ids, pixel values, grids),
configured like a checkpoint's preprocessor_config.json; the pixel rules it applies are in model/pixels.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.chat import item_kind, render_chat
from model.pixels import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    normalize_table,
    patchify,
    resize_frames,
    resize_video_frames,
    sample_frame_indices,
    smart_resize,
    to_rgb_array,
    video_frame_size,
)
from model.tokenizer import Tokenizer
from schemas.jobs import VIDEO_FPS, VIDEO_MAX_FRAMES, VIDEO_MIN_FRAMES


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
