"""Qwen2-VL preprocessing against its references.

- pixels and grids: transformers 4.57.6 `Qwen2VLImageProcessor` (the slow one; its deprecated `videos=` path
  is the reference for video frames, since the video processor needs torchvision);
- frame counts, frame indices, per-frame video size: qwen-vl-utils 0.0.14 `vision_process`, whose functions
  are loaded from its source without its module-level torchvision import;
- chat template: the published Qwen2-VL jinja template rendered by transformers' apply_chat_template.
"""

import ast
import importlib.util
import json
import logging
import math
import os
import time
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.chat import render_chat
from model.pixels import (
    frame_range,
    num_sampled_frames,
    patchify,
    resize_video_frames,
    sample_frame_indices,
    smart_resize,
    video_frame_size,
)
from model.processor import ImageProcessor, Processor
from model.tokenizer import build_qwen2_tokenizer_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The chat template of the published Qwen2-VL-2B/7B/72B-Instruct tokenizer_config.json.
PUBLISHED_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# preprocessor_config.json of the published Qwen2-VL-Instruct checkpoints.
PUBLISHED_PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}

VIDEO_FPS = [23.976, 25, 29.97, 30, 60]
DURATIONS_S = [0.04, 0.5, 1, 1.7, 2, 3.3, 10, 61, 299.5, 600, 1800, 3600, 7200]
# (target fps, min_frames, max_frames); None: the reference's defaults, no keys given.
SAMPLINGS = [None, (2.0, 4, 768), (1.0, 4, 768), (0.5, 2, 64), (4.0, 8, 256), (2.0, 3, 10000), (1.5, 5, 31)]


# -- reference loaders ------------------------------------------------------------------------------------


def _functions_from_source(
    path: Path, names: set[str], namespace: dict, class_name: str | None = None
) -> dict:
    """Exec only the named top-level functions (or methods of `class_name`) and UPPER_CASE constants of a
    module, skipping its imports, in `namespace`."""
    tree = ast.parse(path.read_text())
    body = tree.body
    if class_name:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == class_name).body
    keep = []
    for node in body:
        if isinstance(node, ast.FunctionDef) and node.name in names:
            keep.append(node)
        elif isinstance(node, ast.Assign) and all(
            isinstance(t, ast.Name) and t.id.isupper() and t.id in names for t in node.targets
        ):
            keep.append(node)
    exec(compile(ast.Module(keep, []), str(path), "exec"), namespace)
    return namespace


class _FakeDecordReader:
    """Stands in for decord.VideoReader: a video of `total` frames at `fps`, frames 1x1 black."""

    videos: dict[str, tuple[int, float]] = {}

    def __init__(self, path: str, *args, **kwargs):
        self.total, self.fps = self.videos[path]

    def __len__(self) -> int:
        return self.total

    def get_avg_fps(self) -> float:
        return self.fps

    def get_batch(self, indices):
        assert all(0 <= i < self.total for i in indices)
        return types.SimpleNamespace(asnumpy=lambda: np.zeros((len(indices), 1, 1, 3), np.uint8))


@pytest.fixture(scope="module")
def qwen_vl_utils():
    """qwen-vl-utils 0.0.14's vision_process functions; the torchvision resize is replaced by a recorder."""
    spec = importlib.util.find_spec("qwen_vl_utils")
    if spec is None:
        pytest.skip("qwen-vl-utils==0.0.14 is not installed (dev dependency)")
    path = Path(spec.submodule_search_locations[0]) / "vision_process.py"
    resized = {}

    def resize(video, size, interpolation=None, antialias=None):
        resized["size"] = tuple(size)
        return torch.zeros(1)  # only the size matters; a real frame stack would be gigabytes

    namespace = {
        **{name: getattr(typing, name) for name in ("Optional", "Union", "Tuple", "List", "Dict", "Any")},
        "math": math,
        "torch": torch,
        "np": np,
        "time": time,
        "Image": Image,
        "os": types.SimpleNamespace(environ={}),  # MODEL_SEQ_LEN at its default
        "logger": logging.getLogger("qwen_vl_utils_reference"),
        "transforms": types.SimpleNamespace(functional=types.SimpleNamespace(resize=resize)),
        "InterpolationMode": types.SimpleNamespace(BICUBIC="bicubic"),
    }
    names = set(
        "round_by_factor ceil_by_factor floor_by_factor smart_resize smart_nframes _read_video_decord "
        "calculate_video_frame_range fetch_video MAX_RATIO SPATIAL_MERGE_SIZE IMAGE_MIN_TOKEN_NUM "
        "IMAGE_MAX_TOKEN_NUM VIDEO_MIN_TOKEN_NUM VIDEO_MAX_TOKEN_NUM FPS FRAME_FACTOR FPS_MIN_FRAMES "
        "FPS_MAX_FRAMES MODEL_SEQ_LEN".split()
    )
    ns = _functions_from_source(path, names, namespace)

    def stub_reader(ele):
        n, h, w = ele["stub_shape"]
        return torch.zeros(1, 1, 1, 1, dtype=torch.uint8).expand(n, 3, h, w), {}, 2.0

    ns["VIDEO_READER_BACKENDS"] = {"stub": stub_reader}
    ns["get_video_reader_backend"] = lambda: "stub"
    ns["resized"] = resized
    return ns


def _reference_indices(ref, monkeypatch, total: int, fps: float, ele: dict) -> list[int] | None:
    """Frame indices qwen-vl-utils' decord reader picks (None where it refuses the video)."""
    import decord

    monkeypatch.setattr(decord, "VideoReader", _FakeDecordReader)
    _FakeDecordReader.videos[f"video-{total}-{fps}"] = (total, fps)
    try:
        _, metadata, _ = ref["_read_video_decord"]({"video": f"video-{total}-{fps}", **ele})
    except ValueError:
        return None
    return list(metadata["frames_indices"])


def _reference_video_size(ref, nframes: int, height: int, width: int, **ele) -> tuple[int, int]:
    """(h, w) qwen-vl-utils' fetch_video resizes nframes sampled frames of height x width to."""
    ref["fetch_video"]({"video": "stub", "stub_shape": (nframes, height, width), **ele})
    return ref["resized"]["size"]


@pytest.fixture(scope="module")
def hf_image_processor():
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor


def _hf_pixels(processor, image):
    out = processor(images=[image], return_tensors="np", input_data_format="channels_last")
    return out["pixel_values"], out["image_grid_thw"]


def _hf_video_pixels(processor, frames):
    logging.getLogger("transformers.models.qwen2_vl.image_processing_qwen2_vl").setLevel(logging.ERROR)
    out = processor(images=None, videos=[frames], return_tensors="np", input_data_format="channels_last")
    return out["pixel_values_videos"], out["video_grid_thw"]


# -- sizes ----------------------------------------------------------------------------------------------


def _image_sizes(seed: int, n: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    sizes = []
    while len(sizes) < n:
        h = int(rng.integers(1, 1400))
        w = int(h * math.exp(rng.uniform(-5.3, 5.3)))  # aspect ratios up to ~200 either way
        if 1 <= w <= 3000 and max(h, w) / min(h, w) <= 200:
            sizes.append((h, w))
    return sizes


EXTREME_SIZES = [
    (29, 1000),
    (1000, 29),
    (1, 150),
    (150, 1),
    (1, 200),
    (5, 1000),
    (1000, 5),
    (7, 1400),
    (2, 399),
    (1, 1),
    (13, 13),
    (14, 14),
    (28, 28),
    (56, 56),
    (224, 224),
    (480, 640),
    (640, 480),
    (1080, 1920),
    (2000, 2900),
]
BOUNDS = [
    {},
    {"min_pixels": 256 * 28 * 28, "max_pixels": 512 * 28 * 28},
    {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28},
]


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as reference

    for bounds in BOUNDS:
        for h, w in EXTREME_SIZES + _image_sizes(0, 300):
            assert smart_resize(h, w, **bounds) == reference(h, w, **bounds), (h, w, bounds)
    for h, w in [(1, 201), (1000, 4), (4, 1000)]:
        with pytest.raises(ValueError):
            reference(h, w)
        with pytest.raises(ValueError, match="aspect ratio"):
            smart_resize(h, w)


@pytest.mark.parametrize("bounds", BOUNDS, ids=["default", "large-min", "tiny-max"])
def test_image_pixels_match_transformers(bounds, hf_image_processor):
    ours, reference = ImageProcessor(**bounds), hf_image_processor(**bounds)
    rng = np.random.default_rng(len(bounds))
    sizes = EXTREME_SIZES + _image_sizes(1, 16) if not bounds else EXTREME_SIZES[:12] + _image_sizes(2, 6)
    for h, w in sizes:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref_pixels, ref_grid = _hf_pixels(reference, image)
        pixels, grid = ours.preprocess_image(image)
        assert grid.tolist() == ref_grid.tolist(), (h, w)
        assert pixels.dtype == torch.float32 and pixels.shape == ref_pixels.shape
        assert np.abs(pixels.numpy() - ref_pixels).max() <= 1e-5, (h, w)
        assert ours.grid_thw(1, h, w) == tuple(ref_grid[0])


def test_pil_images_of_any_mode_match_transformers(hf_image_processor):
    reference, ours = hf_image_processor(), ImageProcessor()
    rng = np.random.default_rng(3)
    base = Image.fromarray(rng.integers(0, 256, (97, 203, 4), dtype=np.uint8), "RGBA")
    for image in [base, base.convert("RGB"), base.convert("L"), base.convert("P"), base.convert("CMYK")]:
        ref = reference(images=[image], return_tensors="np")
        ref_pixels, ref_grid = ref["pixel_values"], ref["image_grid_thw"]
        pixels, grid = ours.preprocess_image(image)
        assert grid.tolist() == ref_grid.tolist()
        assert np.abs(pixels.numpy() - ref_pixels).max() <= 1e-5, image.mode


@pytest.mark.parametrize("frames", [1, 2, 5, 6])
def test_video_pixels_match_transformers(frames, hf_image_processor):
    reference, ours = hf_image_processor(), ImageProcessor()
    rng = np.random.default_rng(frames)
    h, w = {1: (57, 83), 2: (56, 84), 5: (123, 301), 6: (336, 448)}[frames]
    video = rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8)
    ref_pixels, ref_grid = _hf_video_pixels(reference, video)
    pixels, grid = ours.preprocess_video(video)
    assert grid.tolist() == ref_grid.tolist()
    assert np.abs(pixels.numpy() - ref_pixels).max() <= 1e-5
    # The same from uint8 frames already at their final size, through torch only (the GPU path).
    resized = torch.from_numpy(ours.resize_video(video))
    pixels_t, grid_t = patchify(resized)
    assert torch.equal(pixels_t, pixels) and torch.equal(grid_t, grid)


# -- video frame resize ----------------------------------------------------------------------------------


def _torchvision_resize(video: torch.Tensor, size: tuple[int, int], keep_uint8: bool) -> torch.Tensor:
    """torchvision's tensor resize of [T, C, H, W] frames with BICUBIC and antialias=True, restated.

    keep_uint8: `transforms.v2.functional.resize` on CPU, which transformers 4.57.6's Qwen2VLVideoProcessor
    calls: uint8 goes to torch's native uint8 kernel. Otherwise `transforms.functional.resize` (v1, what
    qwen-vl-utils 0.0.14's fetch_video calls): uint8 -> float32, interpolate, clamp to 0..255, round, uint8.
    Both return the input untouched when it already has the size.
    """
    if tuple(video.shape[-2:]) == tuple(size):
        return video
    x = video if keep_uint8 else video.to(torch.float32)
    y = torch.nn.functional.interpolate(x, list(size), mode="bicubic", align_corners=False, antialias=True)
    return y if keep_uint8 else y.clamp(0, 255).round().to(torch.uint8)


def _smooth_frames(t: int, h: int, w: int, seed: int) -> np.ndarray:
    """Frames like camera footage: smooth gradients and soft shapes, no pixel-level noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = []
    for _ in range(t):
        fx, fy, phase = rng.uniform(1, 4, 3)
        base = 128 + 60 * np.sin(2 * np.pi * (fx * x / w + fy * y / h + phase))
        ball = 80 * np.exp(-(((x - rng.uniform(0, w)) ** 2 + (y - rng.uniform(0, h)) ** 2) / (0.02 * h * w)))
        frames.append(np.stack([base + ball, base * 0.8 + 20, 255 - base - ball / 2], axis=-1))
    return np.clip(np.rint(np.stack(frames)), 0, 255).astype(np.uint8)


RESIZES = [  # (T, H, W) -> (h, w): shrink, enlarge, one side each way, odd sizes, one frame, no change
    ((5, 360, 640), (364, 644)),
    ((3, 720, 1280), (560, 1008)),
    ((4, 64, 96), (252, 392)),
    ((2, 101, 37), (56, 28)),
    ((1, 45, 80), (224, 392)),
    ((3, 56, 84), (56, 84)),
]


@pytest.mark.parametrize("shape,size", RESIZES, ids=[f"{s[1]}x{s[2]}-{h}x{w}" for s, (h, w) in RESIZES])
def test_video_resize_matches_transformers_video_processor_on_cpu(shape, size):
    rng = np.random.default_rng(sum(shape))
    video = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)  # noise: the hardest case for rounding
    # transformers hands torchvision contiguous [T, C, H, W] uint8 tensors; ours are [T, H, W, C] views.
    expected = _torchvision_resize(torch.from_numpy(video).permute(0, 3, 1, 2).contiguous(), size, True)
    expected = expected.permute(0, 2, 3, 1).numpy()
    ours = resize_video_frames(video, *size)
    assert ours.dtype == np.uint8 and ours.flags.c_contiguous and ours.shape == (shape[0], *size, 3)
    assert np.array_equal(ours, expected)
    # Frame by frame, from a torch tensor, or from a read-only array: the same pixels.
    one_by_one = np.concatenate([resize_video_frames(f[None], *size) for f in video])
    assert np.array_equal(one_by_one, expected)
    assert np.array_equal(resize_video_frames(torch.from_numpy(video), *size), expected)
    video.flags.writeable = False
    assert np.array_equal(resize_video_frames(video, *size), expected)
    # Into a given array (a decode child's shared memory), whole or a slice of frames at a time.
    out = np.zeros((shape[0], *size, 3), np.uint8)
    assert resize_video_frames(video, *size, out=out) is out and np.array_equal(out, expected)
    out[...] = 0
    for i in range(shape[0]):
        resize_video_frames(video[i : i + 1], *size, out=out[i : i + 1])
    assert np.array_equal(out, expected)
    with pytest.raises(ValueError, match="out must be"):
        resize_video_frames(video, *size, out=np.zeros((shape[0], size[0] + 1, size[1], 3), np.uint8))


@pytest.mark.parametrize("shape,size", RESIZES[:5])
def test_video_resize_is_within_one_level_of_qwen_vl_utils(shape, size):
    """qwen-vl-utils resizes in float32 and rounds once; the uint8 kernel rounds after each pass. On footage-
    like frames that moves some values by one level, never more (PIL, the image path, rounds the same way;
    on pixel noise, bicubic overshoot clipped between passes makes larger gaps, for both)."""
    video = _smooth_frames(*shape, seed=shape[1])
    float_path = _torchvision_resize(torch.from_numpy(video).permute(0, 3, 1, 2), size, False)
    diff = np.abs(resize_video_frames(video, *size).astype(int) - float_path.permute(0, 2, 3, 1).numpy())
    assert diff.max() <= 1


def test_video_resize_rejects_other_layouts():
    for bad in (np.zeros((2, 3, 8, 8), np.uint8), np.zeros((2, 8, 8, 3), np.float32), np.zeros((8, 8, 3))):
        with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\]"):
            resize_video_frames(bad, 4, 4)


def test_patchify_rejects_unresized_or_float_frames():
    with pytest.raises(ValueError, match="smart_resize"):
        patchify(torch.zeros(2, 30, 56, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        patchify(torch.zeros(2, 56, 56, 3))


# -- frames ---------------------------------------------------------------------------------------------


def _sampling(sampling) -> dict:
    """The same keys name target fps, min and max frames in qwen-vl-utils' `ele` and in our functions."""
    return {} if sampling is None else dict(zip(("fps", "min_frames", "max_frames"), sampling))


def test_frame_indices_match_qwen_vl_utils(qwen_vl_utils, monkeypatch):
    checked = refused = 0
    for video_fps in VIDEO_FPS:
        for duration in DURATIONS_S:
            total = max(1, round(duration * video_fps))
            for sampling in SAMPLINGS:
                expected = _reference_indices(
                    qwen_vl_utils, monkeypatch, total, video_fps, _sampling(sampling)
                )
                if expected is None:
                    with pytest.raises(ValueError):
                        sample_frame_indices(total, video_fps, **_sampling(sampling))
                    refused += 1
                    continue
                got = sample_frame_indices(total, video_fps, **_sampling(sampling))
                assert got == expected, (video_fps, duration, sampling)
                assert num_sampled_frames(total, video_fps, **_sampling(sampling)) == len(expected)
                checked += 1
    assert checked > 350 and refused > 0


def test_frame_indices_of_a_window_match_qwen_vl_utils(qwen_vl_utils, monkeypatch):
    for video_fps in VIDEO_FPS:
        total = round(7200 * video_fps)
        for start, end in [(0.0, 30.0), (1799.9, 1830.2), (3600, None), (None, 12.34), (7000.5, 7300)]:
            ele = {k: v for k, v in (("video_start", start), ("video_end", end)) if v is not None}
            expected = _reference_indices(qwen_vl_utils, monkeypatch, total, video_fps, ele)
            first, last, count = frame_range(total, video_fps, start, end)
            assert sample_frame_indices(count, video_fps, first_frame=first) == expected
            assert first <= expected[0] and expected[-1] == last


def test_float32_rounding_matters_for_long_videos():
    """Exact (double) spacing picks other frames than the reference's float32 linspace on long videos."""
    total, n = 432000, 10000  # 2 h at 60 fps, max_frames raised
    ours = sample_frame_indices(total, 60, fps=2.0, max_frames=n)
    double = [round(i * (total - 1) / (n - 1)) for i in range(n)]
    assert len(ours) == n and ours != double


def test_video_frame_size_matches_qwen_vl_utils(qwen_vl_utils):
    cases = [
        (4, 56, 56, {}),
        (16, 56, 56, {}),
        (16, 1080, 1920, {}),
        (768, 1080, 1920, {}),
        (768, 2160, 3840, {}),
        (120, 720, 1280, {}),
        (2, 10, 1990, {}),
        (256, 1920, 1080, {}),
        (600, 480, 640, {}),
        (64, 720, 1280, {"max_pixels": 360 * 420}),
        (64, 720, 1280, {"max_pixels": 10**9}),
        (32, 300, 400, {"min_pixels": 64 * 28 * 28}),
        (500, 1080, 1920, {"total_pixels": 20480 * 28 * 28}),
        (8, 1080, 1920, {"total_pixels": 4096 * 28 * 28, "min_pixels": 16 * 28 * 28}),
    ]
    for nframes, h, w, opts in cases:
        expected = _reference_video_size(qwen_vl_utils, nframes, h, w, **opts)
        assert video_frame_size(h, w, nframes, **opts) == expected, (nframes, h, w, opts)


def test_transformers_video_sampler_differs_from_official_rule():
    """transformers 4.57.6's Qwen2VLVideoProcessor.sample_frames (unused by default, do_sample_frames=False)
    picks floor(i * total / n) instead of the official rounded linspace, and its float arange can return one
    frame too many, an odd count. We follow qwen-vl-utils; this pins the difference."""
    import transformers.models.qwen2_vl as qwen2_vl

    ns = {
        "math": math,
        "torch": torch,
        "Optional": typing.Optional,
        "Union": typing.Union,
        "VideoMetadata": object,
    }
    path = Path(qwen2_vl.__file__).parent / "video_processing_qwen2_vl.py"
    sample = _functions_from_source(path, {"sample_frames"}, ns, "Qwen2VLVideoProcessor")["sample_frames"]
    sampler = types.SimpleNamespace(
        num_frames=None, fps=None, temporal_patch_size=2, min_frames=4, max_frames=768
    )

    def hf(total, fps):
        return sample(sampler, types.SimpleNamespace(total_num_frames=total, fps=fps), fps=2.0).tolist()

    assert len(hf(1463, 23.976)) == 123 and len(sample_frame_indices(1463, 23.976)) == 122
    ours, theirs = sample_frame_indices(250, 25), hf(250, 25)
    assert len(ours) == len(theirs) == 20 and ours[-1] == 249 and theirs[-1] < 249


def test_too_short_videos_are_refused():
    with pytest.raises(ValueError, match="as an image"):
        sample_frame_indices(1, 30)
    assert sample_frame_indices(3, 30) == [0, 2]


# -- chat template --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Tokenizer and processor files laid out like a published Qwen2-VL checkpoint (no weights)."""
    path = tmp_path_factory.mktemp("qwen2vl")
    build_qwen2_tokenizer_json(path)
    (path / "preprocessor_config.json").write_text(json.dumps(PUBLISHED_PREPROCESSOR_CONFIG))
    config = {
        "model_type": "qwen2_vl",
        "transformers_version": "4.45.0.dev0",
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
    }
    (path / "config.json").write_text(json.dumps(config))
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "chat_template": PUBLISHED_CHAT_TEMPLATE,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "bos_token": None,
        "model_max_length": 32768,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    from transformers import Qwen2TokenizerFast

    return Qwen2TokenizerFast.from_pretrained(checkpoint)


IMAGE = np.zeros((40, 60, 3), np.uint8)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Describe."}]}],
    [
        {"role": "system", "content": "Be terse."},
        {
            "role": "user",
            "content": [
                {"type": "video", "video": "v"},
                {"type": "text", "text": "What happens?"},
                {"type": "image", "image": IMAGE},
            ],
        },
        {"role": "assistant", "content": "A cat jumps."},
        {"role": "user", "content": [{"type": "text", "text": "And then?\n"}]},
    ],
    [
        {
            "role": "user",
            "content": [
                {"image": IMAGE},
                {"video": "v"},
                {"type": "image_url", "image_url": "u"},
                {"text": "no type key"},
                {"type": "other"},
                {"type": "text", "text": 7},
            ],
        },
        {"role": "system", "content": [{"type": "text", "text": "late system"}]},
        {"role": "assistant", "content": []},
    ],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"}],
]


@pytest.mark.parametrize("add_vision_id", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_published_template(hf_tokenizer, add_generation_prompt, add_vision_id):
    for messages in CONVERSATIONS:
        expected = hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id
        )
        assert render_chat(messages, add_generation_prompt, add_vision_id) == expected


# -- Processor --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_processor(hf_tokenizer):
    """transformers' Qwen2VLProcessor around the slow image processor; its video processor needs torchvision,
    so videos go through the slow image processor's deprecated video path instead."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    image_processor = Qwen2VLImageProcessor(
        **{k: PUBLISHED_PREPROCESSOR_CONFIG[k] for k in ("min_pixels", "max_pixels")}
    )

    def video_processor(videos, **kwargs):
        logging.getLogger("transformers.models.qwen2_vl.image_processing_qwen2_vl").setLevel(logging.ERROR)
        return image_processor(images=None, videos=videos, input_data_format="channels_last")

    video_processor.merge_size = 2
    processor = object.__new__(Qwen2VLProcessor)  # __init__ insists on the torchvision video processor
    processor.image_processor, processor.tokenizer, processor.video_processor = (
        image_processor,
        hf_tokenizer,
        video_processor,
    )
    processor.image_token, processor.video_token = "<|image_pad|>", "<|video_pad|>"
    processor.image_token_id, processor.video_token_id = 151655, 151656
    return processor


def test_processor_matches_transformers_processor(checkpoint, hf_tokenizer, hf_processor):
    rng = np.random.default_rng(7)
    image_a = rng.integers(0, 256, (123, 301, 3), dtype=np.uint8)
    image_b = Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))
    video = rng.integers(0, 256, (5, 90, 120, 3), dtype=np.uint8)  # frames as the model sees them: no fps
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image_a},
                {"type": "video", "video": video},
                {"type": "text", "text": "Compare these, then this:"},
                {"type": "image", "image": image_b},
            ],
        },
    ]
    processor = Processor.from_pretrained(checkpoint)
    ours = processor(messages)
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ref = hf_processor(text=[text], images=[image_a, image_b], videos=[video], return_tensors="np")
    assert ours["input_ids"].tolist() == ref["input_ids"].tolist()
    assert ours["image_grid_thw"].tolist() == ref["image_grid_thw"].tolist()
    assert ours["video_grid_thw"].tolist() == ref["video_grid_thw"].tolist()
    assert np.abs(ours["pixel_values"].numpy() - ref["pixel_values"]).max() <= 1e-5
    assert np.abs(ours["pixel_values_videos"].numpy() - ref["pixel_values_videos"]).max() <= 1e-5

    # Counting needs only shapes, and agrees with the full run.
    shapes = [
        {
            "role": "user",
            "content": [
                {"type": "image", "height": 123, "width": 301},
                {"type": "video", "num_frames": 5, "height": 90, "width": 120},
                {"type": "text", "text": "Compare these, then this:"},
                {"type": "image", "image": image_b},
            ],
        }
    ]
    count = processor.count_tokens(shapes)
    assert count.num_tokens == ours["input_ids"].shape[1]
    ids = ours["input_ids"][0]
    assert count.visual_tokens == int(((ids == 151655) | (ids == 151656)).sum())
    assert count.text_tokens == count.num_tokens - count.visual_tokens


def test_processor_samples_and_resizes_raw_video_like_qwen_vl_utils(checkpoint, qwen_vl_utils, monkeypatch):
    processor = Processor.from_pretrained(checkpoint)
    fps, total, h, w = (
        29.97,
        160,
        45,
        80,
    )  # 5.3 s of tiny video: sampled to 10 frames, upscaled to the minimum
    frames = np.arange(total, dtype=np.uint8)[:, None, None, None].repeat(h, 1).repeat(w, 2).repeat(3, 3)
    inputs = processor([{"role": "user", "content": [{"type": "video", "video": frames, "fps": fps}]}])
    indices = _reference_indices(qwen_vl_utils, monkeypatch, total, fps, {})
    size = _reference_video_size(qwen_vl_utils, len(indices), h, w)
    assert inputs["video_grid_thw"].tolist() == [[len(indices) // 2, size[0] // 14, size[1] // 14]]
    # Each frame is flat, so the sampled frame numbers survive the resize: check they are the reference's.
    seen = processor.prepare_video(frames, fps)
    assert [int(f[0, 0, 0]) for f in seen] == indices
    assert seen.shape[1:3] == size
    # The sampled frames are resized as the decode stage resizes them.
    textured = _smooth_frames(total, h, w, seed=1)
    expected = resize_video_frames(textured[indices], *size)
    assert np.array_equal(processor.prepare_video(textured, fps), expected)
    counted = processor.count_tokens(
        [
            {
                "role": "user",
                "content": [{"type": "video", "num_frames": total, "height": h, "width": w, "fps": fps}],
            }
        ]
    )
    assert counted.num_tokens == inputs["input_ids"].shape[1]
    # Per-item overrides of the sampling reach the plan.
    few = processor.count_tokens(
        [
            {
                "role": "user",
                "content": [
                    {
                        "type": "video",
                        "num_frames": total,
                        "height": h,
                        "width": w,
                        "fps": fps,
                        "sample_fps": 0.5,
                        "min_pixels": 28 * 28,
                    }
                ],
            }
        ]
    )
    assert few.video_grid_thw == [(2, 4, 6)]


def test_processor_errors_name_the_problem(checkpoint, tmp_path):
    processor = Processor.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="remove it from the text"):
        processor.count_tokens([{"role": "user", "content": "look: <|image_pad|>"}])
    with pytest.raises(ValueError, match="as an image"):
        processor([{"role": "user", "content": [{"type": "video", "video": IMAGE[None], "fps": 30.0}]}])
    with pytest.raises(ValueError, match="uint8"):
        processor([{"role": "user", "content": [{"type": "image", "image": IMAGE.astype(np.float32)}]}])
    for name in ("tokenizer.json", "preprocessor_config.json", "config.json"):
        (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"image_token_id": 151654}))
    with pytest.raises(ValueError, match="config.json"):
        Processor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        Processor.from_pretrained(tmp_path)
