"""Pipeline benchmark: decode stages against the raw libraries on the same files, in the same run, and an
end-to-end local job with the tiny random checkpoint.

    python bench/pipeline.py [--videos 6 --seconds 20 --pdfs 4 --pages 12 --no-e2e]

Video: the decode stage (probe, frame count, windows, frame-exact decode, resize, rows as bytes) against
decord's get_batch of the very same frame indices, in frames/s. Documents: the rasterise stage (pages at
the target size, text layer, rows as bytes) against PyMuPDF rendering the same pages at the same scale, in
pages/s. The goal for both ratios is >= 0.9.
"""

from __future__ import annotations

import argparse
import fractions
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.demo import scene  # noqa: E402
from pipeline.job import make_decoder  # noqa: E402
from pipeline.prepare import DecodeUnits  # noqa: E402
from pipeline.sources import expand_inputs  # noqa: E402
from schemas import CaptionRecord, PageRecord, validate_job  # noqa: E402


def make_videos(
    root: Path, n: int, seconds: float, fps: int = 30, size: tuple[int, int] = (640, 360)
) -> Path:
    import av

    root.mkdir(parents=True, exist_ok=True)
    width, height = size
    for k in range(n):
        with av.open(str(root / f"clip{k}.mp4"), "w") as out:
            stream = out.add_stream("h264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"preset": "veryfast", "g": str(2 * fps)}
            for i in range(int(seconds * fps)):
                frame = av.VideoFrame.from_ndarray(
                    scene(i / fps + k, width, height, f"clip {k}"), format="rgb24"
                )
                frame.pts, frame.time_base = i, fractions.Fraction(1, fps)
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
    return root


def make_pdfs(root: Path, n: int, pages: int) -> Path:
    import io

    import pymupdf
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    picture = io.BytesIO()
    Image.fromarray(scene(1.0, 480, 320, "figure")).save(picture, format="PNG")
    for k in range(n):
        doc = pymupdf.open()
        for i in range(pages):
            page = doc.new_page(width=612, height=792)
            page.insert_textbox(
                pymupdf.Rect(54, 54, 558, 420), f"Document {k}, page {i}. " + "Lorem ipsum " * 120, fontsize=9
            )
            page.insert_image(pymupdf.Rect(54, 440, 558, 740), stream=picture.getvalue())
        doc.save(str(root / f"doc{k}.pdf"))
        doc.close()
    return root


def best_of(stage, raw, repeats: int) -> tuple[float, float]:
    """Fastest of a few runs of each, interleaved, so that load from other work hits both alike."""
    stage_s, raw_s = [], []
    for _ in range(repeats):
        for fn, times in ((stage, stage_s), (raw, raw_s)):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return min(stage_s), min(raw_s)


def bench_video(job, repeats: int) -> dict:
    import decord

    from pipeline.video import VideoDecodeConfig, plan_windows, probe_video

    items = expand_inputs(job.inputs, "video")
    stage = DecodeUnits(make_decoder(job), CaptionRecord, "bench")
    cfg = VideoDecodeConfig.from_job(job)
    picks = {
        it.uri: [i for w in plan_windows(probe_video(it.uri), cfg) for i in w.frame_indices] for it in items
    }
    frames = sum(len(p) for p in picks.values())

    def run_stage():
        rows = [t for it in items for t in stage(pa.Table.from_pylist([it.__dict__]))]
        assert all(t.column("status")[0].as_py() == "ok" for t in rows)

    def run_raw():
        for uri, indices in picks.items():
            reader = decord.VideoReader(uri, ctx=decord.cpu(0))
            for at in range(0, len(indices), 16):
                reader.get_batch(indices[at : at + 16]).asnumpy()

    stage_s, raw_s = best_of(run_stage, run_raw, repeats)
    return {
        "frames": frames,
        "stage_fps": frames / stage_s,
        "raw_fps": frames / raw_s,
        "ratio": raw_s / stage_s,
    }


def bench_documents(job, repeats: int) -> dict:
    import pymupdf

    from pipeline.documents import render_scale

    items = expand_inputs(job.inputs, "document")
    stage = DecodeUnits(make_decoder(job), PageRecord, "bench")
    pages = 0
    for it in items:
        with pymupdf.open(it.uri) as doc:
            pages += doc.page_count

    def run_stage():
        rows = [t for it in items for t in stage(pa.Table.from_pylist([it.__dict__]))]
        assert len(rows) == pages and all(t.column("status")[0].as_py() == "ok" for t in rows)

    def run_raw():
        for it in items:
            with pymupdf.open(it.uri) as doc:
                for page in doc:
                    s = render_scale(
                        page.rect.width, page.rect.height, job.target_longest_side, None, job.max_pixels
                    )
                    pix = page.get_pixmap(matrix=pymupdf.Matrix(s, s), colorspace=pymupdf.csRGB, alpha=False)
                    np.frombuffer(pix.samples, dtype=np.uint8)
                    page.get_text("text")

    stage_s, raw_s = best_of(run_stage, run_raw, repeats)
    return {"pages": pages, "stage_pps": pages / stage_s, "raw_pps": pages / raw_s, "ratio": raw_s / stage_s}


def bench_end_to_end(caption_job, ocr_job) -> dict:
    from jobs.run import connect_ray
    from pipeline.job import run_job

    connect_ray(caption_job)
    out = {}
    for name, job in (("windows", caption_job), ("pages", ocr_job)):
        summary = run_job(job, progress=False)
        out[name] = {
            "units": summary.run.units,
            "wall_s": summary.wall_s,
            "per_s": summary.run.units / summary.wall_s,
            "generated_tok_s": summary.generated_tokens_per_s,
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--pdfs", type=int, default=4)
    parser.add_argument("--pages", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end Ray job")
    parser.add_argument("--root", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args()

    root = Path(args.root or tempfile.mkdtemp(prefix="vlbatch-bench-"))
    from model.testing import make_tiny_checkpoint

    checkpoint = root / "tiny-qwen2-vl"
    if not (checkpoint / "config.json").is_file():
        make_tiny_checkpoint(checkpoint)
    videos = make_videos(root / "videos", args.videos, args.seconds)
    docs = make_pdfs(root / "docs", args.pdfs, args.pages)
    common = {
        "model": str(checkpoint),
        "dtype": "float32",
        "sampling": {"max_new_tokens": 8},
        "resources": {"decode_workers": 2, "cpus_per_decode_worker": 1, "gpus_per_worker": 1},
    }
    caption = validate_job(
        {
            **common,
            "kind": "caption_videos",
            "inputs": [str(videos)],
            "output": str(root / "out-captions"),
            "clip_seconds": 10.0,
        }
    )
    ocr = validate_job(
        {**common, "kind": "ocr_documents", "inputs": [str(docs)], "output": str(root / "out-pages")}
    )

    d = bench_documents(ocr, args.repeats)
    print(
        f"document stage     : {d['stage_pps']:8.1f} pages/s  | raw PyMuPDF {d['raw_pps']:7.1f} pages/s  | "
        f"ratio {d['ratio']:.2f} (goal >= 0.9; {d['pages']} pages at longest side {ocr.target_longest_side})"
    )
    v = bench_video(caption, args.repeats)
    print(
        f"video decode stage : {v['stage_fps']:8.1f} frames/s | raw decord {v['raw_fps']:8.1f} frames/s | "
        f"ratio {v['ratio']:.2f} (goal >= 0.9; {v['frames']} sampled frames, {args.videos} h264 640x360)"
    )
    if not args.no_e2e:
        e = bench_end_to_end(caption, ocr)
        for name, r in e.items():
            print(
                f"end to end ({name:7}): {r['per_s']:8.2f} {name}/s ({r['units']} in {r['wall_s']:.1f} s, "
                f"{r['generated_tok_s']:.1f} generated tok/s, tiny random model, Ray start-up included)"
            )
    print(f"files in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
