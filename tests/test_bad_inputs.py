"""Each bad input of issue #6 through the isolated decode stages: exact rows, each item once, the job goes on.

Each decoder runs in its killable child (pipeline.decode.supervisor), as in a job; good files sit between
the bad ones to show the child keeps working after each failure.
"""

from __future__ import annotations

import functools
import os
import shutil
import struct
import tempfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from media import (
    break_xref,
    make_audio_only,
    make_empty_pdf,
    make_image,
    make_pdf,
    make_random_bytes,
    make_video,
    strip_mp4_timing,
    truncate,
)

from pipeline.decode.documents import DocumentConfig, RasteriseDocument
from pipeline.decode.supervisor import IsolatedDecoder
from pipeline.decode.video import DecodeVideo
from pipeline.decode.windows import VideoDecodeConfig
from pipeline.faults import DecodeFaults
from pipeline.sources import expand_inputs

NOBODY = 65534
VIDEO_CFG = VideoDecodeConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
# Pages render at 72 dpi under a cap far below the 200 x 200 inch page's full size (14400 x 14400 px).
DOC_CFG = DocumentConfig(target_longest_side=None, dpi=72.0, max_pixels=28 * 28 * 1024)

VIDEO_ERRORS = {  # file -> what the error message must say after naming the file
    "empty.mp4": "not a readable video",
    "random.mp4": "not a readable video",
    "truncated.mp4": "not a readable video",  # cut in half: the index (moov) at the end is gone
    "audio_only.mp4": "has no video stream",
    "zero_fps.mp4": "reports no frame rate and no duration",
}
DOC_ERRORS = {
    "empty.pdf": "not a readable PDF",
    "random.pdf": "not a readable PDF",
    "encrypted.pdf": "encrypted with a password",
    "zero_pages.pdf": "the PDF has no pages",
    "truncated.pdf": "the PDF has no pages",  # opens with 0 pages: the case where doc[-1] spins forever
    "bomb.png": "a decompression bomb?",  # 20000 x 20000: Pillow itself refuses it
    "big.png": f"image of 10000x10000 exceeds limits.max_pixels={DOC_CFG.max_source_pixels}",
}


def make_png_bomb(path: Path, side: int) -> Path:
    """A real 1-bit PNG of side x side pixels, all black: a few kilobytes that inflate to side^2 pixels."""
    line = bytes(1 + (side + 7) // 8)  # filter byte + packed pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(line * 500) for _ in range(side // 500)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
    return path


def as_user(uid: int, factory):
    """Build the decoder after giving up root, in the child: only then does a chmod 000 file stay shut."""
    os.setgid(uid)
    os.setuid(uid)
    return factory()


def decode_all(factory, items) -> dict[str, list[dict[str, Any]]]:
    """Rows of each item, by item id, through one isolated decoder; every row must carry its own item's id."""
    decoder = IsolatedDecoder(factory, 60.0, 1, DecodeFaults())
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        for it in items:
            rows = list(decoder({"uri": it.uri, "item_id": it.item_id}))
            assert rows and {r["item_id"] for r in rows} == {it.item_id}
            out[it.item_id] = rows
    finally:
        decoder.close()
    return out


def assert_one_error(rows: list[dict[str, Any]], uri: str, fragment: str) -> None:
    (row,) = rows
    assert row["status"] == "error" and row["error_stage"] == "decode"
    assert row["error_message"].startswith(f"{uri}: ") and fragment in row["error_message"]


def assert_each_unit_once(rows_by_item: dict[str, list[dict[str, Any]]], key: str) -> None:
    units = Counter((item_id, r.get(key)) for item_id, rows in rows_by_item.items() for r in rows)
    assert all(n == 1 for n in units.values()), [u for u, n in units.items() if n > 1]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-videos")
    (root / "empty.mp4").write_bytes(b"")
    make_random_bytes(root / "random.mp4")
    truncate(make_video(root / "whole.mp4", n_frames=48), 0.5, root / "truncated.mp4")
    index_first = make_video(root / "fs.mp4", n_frames=48, container_options={"movflags": "faststart"})
    truncate(index_first, 0.8, root / "truncated_index_first.mp4")
    for name in ("whole.mp4", "fs.mp4"):
        (root / name).unlink()
    make_audio_only(root / "audio_only.mp4")
    make_video(root / "one_frame.mp4", n_frames=1)
    make_video(root / "wide.mp4", n_frames=12, size=(1920, 40))
    make_video(root / "tall.mp4", n_frames=12, size=(40, 1920))
    strip_mp4_timing(make_video(root / "zero_fps.mp4", "mpeg4", n_frames=24))  # nothing left to get a rate
    strip_mp4_timing(make_video(root / "no_duration.mp4", "h264", n_frames=24, fps=24))  # h264 keeps its rate
    make_video(root / "good.mp4", n_frames=24)
    return root


def test_bad_videos_each_end_in_their_rows(videos):
    items = expand_inputs([str(videos)], "video")
    assert len(items) == len(list(videos.iterdir()))  # nothing filtered out before decode
    rows = decode_all(functools.partial(DecodeVideo, VIDEO_CFG), items)
    assert_each_unit_once(rows, "window_index")
    by_name = {Path(it.uri).name: rows[it.item_id] for it in items}
    for name, fragment in VIDEO_ERRORS.items():
        assert_one_error(by_name[name], str(videos / name), fragment)

    for name in ("good.mp4", "wide.mp4", "tall.mp4", "no_duration.mp4", "truncated_index_first.mp4"):
        (row,) = by_name[name]  # all short enough for one window
        assert row["status"] == "ok" and row["window_index"] == 0, (name, row.get("error_message"))
        t, h, w, _ = row["pixels"].shape
        assert t == row["frame_count"] >= VIDEO_CFG.min_frames and h % 28 == 0 and w % 28 == 0
        assert h * w <= VIDEO_CFG.max_pixels
    (wide,), (tall,) = by_name["wide.mp4"], by_name["tall.mp4"]
    assert (wide["source_width"], wide["source_height"]) == (1920, 40) and wide["width"] > 20 * wide["height"]
    assert (tall["width"], tall["height"]) == (wide["height"], wide["width"])  # the same rules, turned
    (no_duration,) = by_name["no_duration.mp4"]
    assert no_duration["source_fps"] == 24.0  # the container's timing is zeroed; the h264 stream's is not
    # The cut copy whose index comes first decodes the frames it really holds, and only those.
    (cut,) = by_name["truncated_index_first.mp4"]
    held = 0
    with av.open(str(videos / "truncated_index_first.mp4")) as container:
        for packet in container.demux(video=0):
            try:
                held += len(packet.decode())
            except av.InvalidDataError:  # the packet the cut went through
                pass
    assert cut["source_frame_count"] == held < 48 and max(cut["frame_indices"]) < held
    assert "claims 48 frames" in cut["warning"]  # flagged, not silently short
    # One frame is a still: shown to the model twice, counted once.
    (one,) = by_name["one_frame.mp4"]
    assert one["status"] == "ok" and one["frame_count"] == 1 and one["pixels"].shape[0] == 2
    assert one["frame_indices"] == [0] and np.array_equal(one["pixels"][0], one["pixels"][1])
    assert by_name["good.mp4"][0]["warning"] is None


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-docs")
    (root / "empty.pdf").write_bytes(b"")
    make_random_bytes(root / "random.pdf", seed=1)
    make_pdf(root / "encrypted.pdf", password="secret")
    break_xref(make_pdf(root / "broken_xref.pdf", pages=3))
    make_empty_pdf(root / "zero_pages.pdf")
    truncate(make_pdf(root / "whole.pdf", pages=4, object_streams=True), 0.5, root / "truncated.pdf")
    (root / "whole.pdf").unlink()
    make_pdf(root / "huge_page.pdf", pages=1, page_size=(200 * 72.0, 200 * 72.0))  # 200 x 200 inches
    make_png_bomb(root / "bomb.png", 20000)
    make_png_bomb(root / "big.png", 10000)
    make_pdf(root / "good.pdf", pages=2)
    make_image(root / "good.png")
    return root


def test_bad_documents_each_end_in_their_rows(documents):
    items = expand_inputs([str(documents)], "document")
    assert len(items) == len(list(documents.iterdir()))
    rows = decode_all(functools.partial(RasteriseDocument, DOC_CFG), items)
    assert_each_unit_once(rows, "page_index")
    by_name = {Path(it.uri).name: rows[it.item_id] for it in items}
    for name, fragment in DOC_ERRORS.items():
        assert_one_error(by_name[name], str(documents / name), fragment)

    # MuPDF rebuilds a broken cross-reference table by scanning the file: every page reads, text and all.
    repaired = by_name["broken_xref.pdf"]
    assert [(r["status"], r["page_index"]) for r in repaired] == [("ok", 0), ("ok", 1), ("ok", 2)]
    assert [r["text_layer"].split("\n")[0] for r in repaired] == ["page 0", "page 1", "page 2"]
    # The 200-inch page is rendered under the pixel cap, never at its full 14400 x 14400.
    (huge,) = by_name["huge_page.pdf"]
    assert huge["status"] == "ok" and huge["page_width_pt"] == 14400.0
    page = huge["pixels"]
    assert page.shape[0] == page.shape[1] and page.size // 3 <= DOC_CFG.max_pixels
    assert [r["status"] for r in by_name["good.pdf"]] == ["ok", "ok"]
    assert [r["status"] for r in by_name["good.png"]] == ["ok"]


@pytest.mark.parametrize("kind", ["document", "video"])
def test_an_unreadable_file_is_an_error_row_naming_it(kind):
    # /tmp/pytest-of-root is 0700, which would hide the file from an unprivileged reader altogether.
    root = Path(tempfile.mkdtemp(prefix="vlbatch-unreadable-"))
    try:
        root.chmod(0o711)
        if kind == "document":
            locked = make_pdf(root / "locked.pdf", pages=1)
            factory = functools.partial(RasteriseDocument, DOC_CFG)
        else:
            locked = make_video(root / "locked.mp4", "h264", n_frames=8)
            factory = functools.partial(DecodeVideo, VIDEO_CFG)
        locked.chmod(0o000)
        (item,) = expand_inputs([str(locked)], kind)  # listing needs no read permission
        if os.geteuid() == 0:  # root reads any file: the child gives up root first, then really cannot
            factory = functools.partial(as_user, NOBODY, factory)
        rows = decode_all(factory, [item])[item.item_id]
        assert_one_error(rows, str(locked), "permission denied; make the file readable by the job's user")
    finally:
        shutil.rmtree(root)


def test_a_missing_input_fails_the_job_at_start(tmp_path):
    make_pdf(tmp_path / "there.pdf", pages=1)
    missing = tmp_path / "not-there.pdf"
    with pytest.raises(ValueError, match=f"input {missing}: {missing} does not exist; fix the path"):
        expand_inputs([str(tmp_path / "there.pdf"), str(missing)], "document")
