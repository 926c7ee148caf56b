"""Shared fixtures. Nothing here downloads: transformers is kept offline for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The Triton decode kernel runs on the CPU through Triton's interpreter, which is chosen when a kernel is
# defined: before any test imports model.engine.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random tiny Qwen2-VL checkpoint in the published layout, with the real Qwen2 tokenizer."""
    from model.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray per test session, bound to 127.0.0.1; more logical CPUs than cores so that the
    pipeline's actor pools (each asking for a fraction of a CPU) can never starve one another."""
    import ray

    from jobs.run import loopback_only

    if not ray.is_initialized():
        loopback_only()
        ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield ray
    ray.shutdown()


# Media of the pipeline tests: (encoder, frames, fps, (width, height), B-frames). b.avi lasts 5 s, so
# 2-second windows cut it in three; the others fit one window.
PIPELINE_VIDEOS = {
    "a.mp4": ("h264", 48, 24, (96, 64), 2),
    "b.avi": ("mpeg4", 60, 12, (64, 48), 2),
    "c.webm": ("libvpx-vp9", 30, 15, (160, 120), 0),
    "d.mkv": ("hevc", 36, 24, (112, 80), 2),
}
PIPELINE_PDFS = {
    "e.pdf": {"pages": 3, "image_only_pages": (1,)},
    "f.pdf": {"pages": 2, "page_size": (300.0, 420.0)},
}
PIPELINE_IMAGES = {"g.png": (300, 200), "h.jpg": (60, 90)}  # g.png is downscaled to the target side


@pytest.fixture(scope="session")
def pipeline_corpus(tmp_path_factory, tiny_checkpoint) -> dict:
    """Videos, PDFs and images for end-to-end runs, plus job specs (as dicts) over them."""
    from media import make_image, make_pdf, make_video

    root = tmp_path_factory.mktemp("pipeline-corpus")
    (root / "videos").mkdir()
    (root / "docs").mkdir()
    for name, (codec, frames, fps, size, b_frames) in PIPELINE_VIDEOS.items():
        make_video(root / "videos" / name, codec, n_frames=frames, fps=fps, size=size, b_frames=b_frames)
    for name, kwargs in PIPELINE_PDFS.items():
        make_pdf(root / "docs" / name, **kwargs)
    for name, size in PIPELINE_IMAGES.items():
        make_image(root / "docs" / name, size=size)
    common = {
        "model": str(tiny_checkpoint),
        "dtype": "float32",
        "device": "cpu",
        "sampling": {"max_new_tokens": 4},
        # Fractions of a CPU per actor: the pools fit beside each other on a 2-core machine.
        "resources": {"decode_workers": 1, "cpus_per_decode_worker": 0.5, "gpu_workers": 1,
                      "gpus_per_worker": 0, "max_batch_tokens": 160},
    }
    caption = {**common, "kind": "caption_videos", "inputs": [str(root / "videos")],
               "output": str(root / "out-videos"), "clip_seconds": 2.0, "min_pixels": 28 * 28 * 4,
               "max_pixels": 28 * 28 * 16}
    ocr = {**common, "kind": "ocr_documents", "inputs": [str(root / "docs")],
           "output": str(root / "out-docs"), "target_longest_side": 224}
    return {"root": root, "caption": caption, "ocr": ocr}


@pytest.fixture(scope="session")
def pipeline_runs(pipeline_corpus, ray_local) -> dict:
    """Both jobs run once over the corpus, on the session's local Ray: {kind: (job, summary)}."""
    from pipeline.job import run_job
    from schemas import validate_job

    runs = {}
    for kind in ("caption", "ocr"):
        job = validate_job(pipeline_corpus[kind])
        runs[kind] = (job, run_job(job, progress=False))
    return runs
