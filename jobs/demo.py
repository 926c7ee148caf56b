"""`make demo`: sample videos, PDFs and images plus a tiny random checkpoint, both jobs on a local Ray.

Everything lands in ./demo_out (or the directory given). The checkpoint has random weights, so the text it
writes is noise: the demo shows the pipeline, not the model. Real use points --model at a downloaded
checkpoint, e.g. Qwen2-VL-2B-Instruct.
"""

from __future__ import annotations

import argparse
import fractions
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REAL_MODEL_HINT = (
    "The demo model has random weights: its captions and transcriptions are noise. For real output run\n"
    "  vlbatch caption-videos VIDEOS... --out DIR --model /path/to/Qwen2-VL-2B-Instruct\n"
    "  vlbatch ocr-documents DOCUMENTS... --out DIR --model /path/to/Qwen2-VL-2B-Instruct"
)


def scene(t: float, width: int, height: int, label: str) -> np.ndarray:
    """A frame of a simple moving scene: a gradient sky, a ball crossing it, a caption in the corner."""
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    sky = np.concatenate([40 + 80 * y + 0 * x, 90 + 60 * y + 40 * x, 160 + 60 * x + 0 * y], axis=2)
    image = Image.fromarray(sky.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cx, cy, r = (0.1 + 0.8 * (t % 4) / 4) * width, height * 0.6, height * 0.12
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(230, 80, 40))
    draw.rectangle([0, height * 0.8, width, height], fill=(60, 130, 60))
    draw.text((6, 6), f"{label}  t={t:4.1f}s", fill=(255, 255, 255))
    return np.asarray(image)


def write_video(path: Path, codec: str, seconds: float, fps: int, size: tuple[int, int]) -> Path:
    import av

    width, height = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(scene(i / fps, width, height, path.name), format="rgb24")
            frame.pts, frame.time_base = i, fractions.Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def write_pdf(path: Path, pages: int) -> Path:
    import io

    import pymupdf

    doc = pymupdf.open()
    for i in range(pages):
        page = doc.new_page(width=595, height=842)  # A4 in points
        if i == pages - 1:  # a scanned page: pixels only, no text layer
            buf = io.BytesIO()
            Image.fromarray(scene(i, 400, 560, f"scan {i + 1}")).save(buf, format="PNG")
            page.insert_image(page.rect, stream=buf.getvalue())
            continue
        page.insert_text((72, 90), f"vlbatch demo, page {i + 1}", fontsize=20)
        body = "Batch captioning and OCR with Qwen2-VL on Ray. " * 3
        page.insert_textbox(pymupdf.Rect(72, 120, 523, 400), body, fontsize=11)
    doc.save(str(path))
    doc.close()
    return path


def write_receipt(path: Path) -> Path:
    image = Image.new("RGB", (360, 480), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    lines = ["CORNER SHOP", "", "coffee      2.50", "bagel       3.10", "", "TOTAL       5.60"]
    for k, line in enumerate(lines):
        draw.text((30, 30 + 28 * k), line, fill=(20, 20, 20))
    image.save(path)
    return path


def make_samples(root: Path) -> tuple[Path, Path]:
    """Videos in root/videos (h264 and vp9, one long enough for several windows), documents in root/docs."""
    videos, docs = root / "videos", root / "docs"
    videos.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)
    if not any(videos.iterdir()):
        write_video(videos / "ball.mp4", "h264", seconds=6, fps=12, size=(160, 120))
        write_video(videos / "ball-long.webm", "libvpx-vp9", seconds=13, fps=8, size=(192, 108))
    if not any(docs.iterdir()):
        write_pdf(docs / "report.pdf", pages=3)
        write_receipt(docs / "receipt.png")
    return videos, docs


def show(output: Path, unit: str, rows: int = 3) -> None:
    import pandas as pd

    df = pd.read_parquet(output)
    print(f"\n{output}: {len(df)} rows, one per {unit}")
    columns = [
        c
        for c in ("uri", "window_index", "start_s", "page_number", "status", "visual_tokens", "text")
        if c in df.columns
    ]
    head = df[columns].head(rows).copy()
    head["uri"] = head.uri.map(lambda u: Path(u).name)
    head["text"] = head.text.fillna("").map(lambda t: t[:40].replace("\n", " "))
    print(head.to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__)
    parser.add_argument("root", nargs="?", default="demo_out", help="where samples and outputs go")
    args = parser.parse_args(argv)

    from jobs.run import run
    from model.testing import make_tiny_checkpoint
    from schemas import validate_job

    root = Path(args.root).resolve()
    videos, docs = make_samples(root)
    checkpoint = root / "tiny-qwen2-vl"
    if not (checkpoint / "config.json").is_file():
        print(f"writing a tiny random Qwen2-VL checkpoint to {checkpoint}")
        make_tiny_checkpoint(checkpoint)
    common = {
        "model": str(checkpoint),
        "dtype": "float32",
        "sampling": {"max_new_tokens": 24},
        "resources": {
            "decode_workers": 1,
            "cpus_per_decode_worker": 0.5,
            "gpu_workers": 1,
            "gpus_per_worker": 0.5,
        },
    }
    caption = validate_job(
        {
            **common,
            "kind": "caption_videos",
            "inputs": [str(videos)],
            "output": str(root / "captions"),
            "clip_seconds": 4.0,
            "fps": 1.0,
            "min_pixels": 28 * 28 * 16,
            "max_pixels": 28 * 28 * 64,
        }
    )
    ocr = validate_job(
        {
            **common,
            "kind": "ocr_documents",
            "inputs": [str(docs)],
            "output": str(root / "pages"),
            "target_longest_side": 448,
        }
    )
    for job in (caption, ocr):
        run(job)
    show(root / "captions", "video window")
    show(root / "pages", "document page")
    from jobs.report import write_report

    reports = [write_report(root / name, samples=6) for name in ("captions", "pages")]
    print("\nReports (open in a browser):", *reports)
    print(f"\nParquet datasets: {root / 'captions'} and {root / 'pages'} (manifests: _manifest.json in each)")
    print(REAL_MODEL_HINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
