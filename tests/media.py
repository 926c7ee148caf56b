"""Deterministic test media: videos whose pixels carry their frame index, PDFs, images, broken files.

Everything is generated with PyAV, PyMuPDF and PIL (no ffmpeg binary), tiny, and identical run to run.
"""

from __future__ import annotations

import fractions
import io
import os
from pathlib import Path

import av
import numpy as np
from PIL import Image

os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its banner to stderr unless told to log errors only

# The frame index is drawn as a 4x4 grid of black/white cells: 8 cells hold the index bits, the other 8
# their complement, so a frame that is not cleanly one of ours decodes to None instead of a wrong number.
GRID = 4
INDEX_BITS = 8
MAX_INDEX = (1 << INDEX_BITS) - 1


def index_frame(index: int, width: int, height: int) -> np.ndarray:
    """An RGB frame whose cells encode `index` (0..255) robustly enough to survive lossy codecs."""
    if not 0 <= index <= MAX_INDEX:
        raise ValueError(f"frame index {index} does not fit in {INDEX_BITS} bits")
    bits = [(index >> b) & 1 for b in range(INDEX_BITS)]
    cells = bits + [1 - b for b in bits]
    frame = np.zeros((height, width, 3), dtype=np.uint8)
    for k, on in enumerate(cells):
        r, c = divmod(k, GRID)
        y0, y1 = r * height // GRID, (r + 1) * height // GRID
        x0, x1 = c * width // GRID, (c + 1) * width // GRID
        frame[y0:y1, x0:x1] = 255 if on else 0
    return frame


def read_index(frame: np.ndarray) -> int | None:
    """The index drawn by `index_frame`, read at cell centres of a frame of any size; None if unreadable."""
    height, width = frame.shape[:2]
    gray = frame.astype(np.float32).mean(axis=2)
    cells = []
    for k in range(GRID * GRID):
        r, c = divmod(k, GRID)
        # Sample the middle half of each cell: edges blur under compression and resizing.
        y0, x0 = int((r + 0.25) * height / GRID), int((c + 0.25) * width / GRID)
        y1, x1 = max(int((r + 0.75) * height / GRID), y0 + 1), max(int((c + 0.75) * width / GRID), x0 + 1)
        cells.append(1 if gray[y0:y1, x0:x1].mean() > 127 else 0)
    bits, check = cells[:INDEX_BITS], cells[INDEX_BITS:]
    if any(b == c for b, c in zip(bits, check)):
        return None
    return sum(b << i for i, b in enumerate(bits))


def make_video(
    path: str | Path,
    codec: str = "h264",
    container: str | None = None,
    n_frames: int = 48,
    fps: int = 24,
    size: tuple[int, int] = (96, 64),
    b_frames: int = 0,
    index_pattern: bool = True,
    audio: bool = False,
    container_options: dict[str, str] | None = None,
) -> Path:
    """Write a video of `n_frames` (width, height) = `size` frames; frame i shows index i (mod 256).

    `container_options` go to the muxer, e.g. {"movflags": "faststart"} puts the MP4 index first.
    """
    path = Path(path)
    width, height = size
    options = {}
    if codec in ("h264", "libx264"):
        options = {"preset": "ultrafast", "crf": "18", "bf": str(b_frames)}
    elif codec in ("hevc", "libx265"):
        options = {"preset": "ultrafast", "crf": "18", "x265-params": f"log-level=none:bframes={b_frames}"}
    elif codec == "libsvtav1":
        options = {"preset": "8", "crf": "30"}  # presets above 10 leave visible artifacts at these sizes
    elif codec in ("vp9", "libvpx-vp9"):
        options = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
    with av.open(str(path), "w", format=container, options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if codec in ("mpeg4", "msmpeg4", "msmpeg4v2", "msmpeg4v3", "wmv2", "mpeg2video"):
            stream.bit_rate = 2_000_000
            stream.codec_context.max_b_frames = b_frames
            stream.codec_context.gop_size = 12
        stream.options = options
        audio_stream = out.add_stream("aac", rate=16000) if audio else None
        rng = np.random.default_rng(0)
        for i in range(n_frames):
            if index_pattern:
                pixels = index_frame(i % (MAX_INDEX + 1), width, height)
            else:
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            frame.time_base = fractions.Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if audio_stream is not None:
            _write_silence(out, audio_stream, seconds=n_frames / fps)
    return path


def make_flat_video(path: str | Path, seconds: float, fps: int, size: tuple[int, int]) -> Path:
    """A long h264 video that is cheap to encode: flat colours, changing every second, a corner block.

    Eight frames are converted once and sent again and again, so minutes of 4K encode in seconds.
    """
    path = Path(path)
    width, height = size
    count = max(1, round(seconds * fps))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("h264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "30", "g": str(fps * 10)}
        frames = []
        for k in range(8):
            rgb = np.empty((height, width, 3), np.uint8)
            rgb[:] = ((k * 37) % 256, (k * 91) % 256, (k * 53) % 256)
            rgb[: height // 8, : width // 8] = 255
            frames.append(av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p"))
        for i in range(count):
            frame = frames[(i // fps) % len(frames)]
            frame.pts = i
            frame.time_base = fractions.Fraction(1, fps)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def make_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    """A media file with one audio stream and no video stream."""
    path = Path(path)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        _write_silence(out, stream, seconds)
    return path


def _write_silence(out: av.container.OutputContainer, stream: av.AudioStream, seconds: float) -> None:
    samples = int(seconds * stream.rate)
    chunk = 1024
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, n), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = stream.rate
        frame.pts = start
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def truncate(path: str | Path, keep: float, out: str | Path | None = None) -> Path:
    """Copy of `path` cut to the first `keep` fraction of its bytes, as an interrupted download leaves it."""
    path = Path(path)
    data = path.read_bytes()
    target = Path(out) if out is not None else path
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def make_random_bytes(path: str | Path, n: int = 4096, seed: int = 0) -> Path:
    """A file of random bytes, e.g. named .mp4 or .pdf to pose as one."""
    path = Path(path)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    return path


def make_image(
    path: str | Path, fmt: str | None = None, size: tuple[int, int] = (96, 64), index: int = 7
) -> Path:
    """An RGB image (PNG/JPEG/TIFF by suffix or `fmt`) showing the index pattern of `index`."""
    path = Path(path)
    width, height = size
    Image.fromarray(index_frame(index, width, height)).save(path, format=fmt)
    return path


def make_pdf(
    path: str | Path,
    pages: int = 3,
    text: bool = True,
    image_only_pages: tuple[int, ...] = (),
    page_size: tuple[float, float] = (200.0, 150.0),
    sizes: dict[int, tuple[float, float]] | None = None,
    password: str | None = None,
    object_streams: bool = False,
) -> Path:
    """A PDF whose page i carries the text "page {i}" (unless image-only) and a small image.

    `image_only_pages` get only a picture (no text layer), `sizes` overrides the size in points of some
    pages, `password` encrypts the file (AES-256, user password), `object_streams` packs the objects into
    compressed streams at the end (so a truncated copy opens with 0 pages).
    """
    import pymupdf

    path = Path(path)
    doc = pymupdf.open()
    for i in range(pages):
        w, h = (sizes or {}).get(i, page_size)
        page = doc.new_page(width=w, height=h)
        buf = io.BytesIO()
        Image.fromarray(index_frame(i % (MAX_INDEX + 1), 32, 24)).save(buf, format="PNG")
        if i in image_only_pages:
            page.insert_image(page.rect, stream=buf.getvalue(), keep_proportion=False)
            continue
        page.insert_image(pymupdf.Rect(w / 2, h / 2, w - 4, h - 4), stream=buf.getvalue())
        if text:
            page.insert_text((10, 20), f"page {i}", fontsize=11)
            page.insert_text((10, 36), "Hello vlbatch", fontsize=9)
    kwargs: dict = {"use_objstms": 1, "garbage": 3, "deflate": True} if object_streams else {}
    if password is not None:
        kwargs.update(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw=password, owner_pw=password + "-owner")
    doc.save(str(path), **kwargs)
    doc.close()
    return path


def make_empty_pdf(path: str | Path) -> Path:
    """A well-formed PDF with zero pages (PyMuPDF refuses to save one, so it is spelled out byte by byte)."""
    path = Path(path)
    body = [b"%PDF-1.4\n"]
    offsets = []
    for obj in (b"<</Type/Catalog/Pages 2 0 R>>", b"<</Type/Pages/Kids[]/Count 0>>"):
        offsets.append(sum(len(b) for b in body))
        body.append(b"%d 0 obj\n%s\nendobj\n" % (len(offsets), obj))
    xref_at = sum(len(b) for b in body)
    body.append(b"xref\n0 3\n0000000000 65535 f \n")
    body += [b"%010d 00000 n \n" % off for off in offsets]
    body.append(b"trailer\n<</Size 3/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % xref_at)
    path.write_bytes(b"".join(body))
    return path


def break_xref(path: str | Path) -> Path:
    """Point a PDF's startxref at a wrong offset, as a broken cross-reference table looks to a reader."""
    path = Path(path)
    data = path.read_bytes()
    at = data.rfind(b"startxref")
    path.write_bytes(data[:at] + b"startxref\n17\n%%EOF\n")
    return path


def strip_mp4_timing(path: str | Path) -> Path:
    """Zero the durations of an MP4 (movie, track, media headers and every sample): no fps, no duration."""
    import struct

    path = Path(path)
    data = bytearray(path.read_bytes())
    at = data.find(b"stts")
    for k in range(struct.unpack(">I", data[at + 8 : at + 12])[0]):  # entries of (count, delta)
        data[at + 16 + 8 * k : at + 20 + 8 * k] = bytes(4)
    for box, skip in ((b"mvhd", 4), (b"mdhd", 4), (b"tkhd", 8)):  # skip: timescale or track id + reserved
        at = data.find(box)
        wide = data[at + 4] == 1  # version 1 boxes use 64-bit times
        start = at + 8 + (16 if wide else 8) + skip
        data[start : start + (8 if wide else 4)] = bytes(8 if wide else 4)
    path.write_bytes(bytes(data))
    return path


def cpu_overrides(max_new_tokens: int = 2) -> list[str]:
    """`--set` values that make a CLI job small and CPU-only: one decode worker at half a CPU, float32."""
    return [
        "dtype=float32",
        "device=cpu",
        f"sampling.max_new_tokens={max_new_tokens}",
        "resources.decode_workers=1",
        "resources.cpus_per_decode_worker=0.5",
        "resources.gpus_per_worker=0",
    ]
