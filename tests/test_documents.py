"""Document rasterise: one row per page at the target size, the text layer kept, bad files as error rows."""

from __future__ import annotations

import gc
import multiprocessing

import numpy as np
import pymupdf
import pytest
from media import break_xref, make_empty_pdf, make_image, make_pdf, make_random_bytes, read_index, truncate
from PIL import Image

import pipeline.decode.documents as documents
from pipeline.decode.documents import (
    DocumentConfig,
    RasteriseDocument,
    iter_document_pages,
    rasterise_page,
    render_scale,
    select_pages,
)
from pipeline.decode.files import DecodeError


def rows_of(path, **cfg) -> list[dict]:
    return list(RasteriseDocument(DocumentConfig(**cfg))({"uri": str(path), "item_id": "doc"}))


def test_pages_render_at_the_target_longest_side_with_their_text(tmp_path):
    sizes = {0: (200.0, 150.0), 1: (150.0, 400.0), 2: (612.0, 792.0)}
    path = make_pdf(tmp_path / "a.pdf", pages=3, image_only_pages=(1,), sizes=sizes)
    rows = rows_of(path)
    assert [r["page_index"] for r in rows] == [0, 1, 2] and [r["page_number"] for r in rows] == [1, 2, 3]
    for row, (w_pt, h_pt) in zip(rows, sizes.values(), strict=True):
        assert row["status"] == "ok" and row["item_id"] == "doc" and row["page_count"] == 3
        image = row["pixels"]
        assert image.dtype == np.uint8 and image.shape == (row["height"], row["width"], 3)
        assert max(image.shape[:2]) == 1288
        assert (image.shape[1] > image.shape[0]) == (w_pt > h_pt)
        assert (row["page_width_pt"], row["page_height_pt"]) == (w_pt, h_pt)
    assert "page 0" in rows[0]["text_layer"] and rows[0]["has_text_layer"]
    assert rows[1]["has_text_layer"] is False and rows[1]["text_layer"].strip() == ""
    # The image-only page is the picture of page index 1, drawn over the whole page.
    assert read_index(rows[1]["pixels"]) == 1


def test_dpi_and_text_layer_off(tmp_path):
    path = make_pdf(tmp_path / "a.pdf", pages=1, page_size=(72.0, 36.0))
    (row,) = rows_of(path, dpi=144.0, target_longest_side=None, keep_text_layer=False)
    assert row["pixels"].shape == (72, 144, 3)
    assert row["text_layer"] is None and row["has_text_layer"] is None


def test_huge_page_is_capped_before_rendering(tmp_path):
    inches = 200 * 72.0
    path = make_pdf(tmp_path / "huge.pdf", pages=1, page_size=(inches, inches))
    cap = 1_000_000
    (row,) = rows_of(path, dpi=72.0, target_longest_side=None, max_pixels=cap)
    assert row["status"] == "ok" and row["height"] * row["width"] <= cap
    assert row["height"] * row["width"] > 0.99 * cap  # capped, not shrunk to nothing
    assert render_scale(inches, inches, None, 72.0, cap) < 1.0


def test_render_scale_never_exceeds_the_cap_after_rounding():
    for w, h in [(612.0, 792.0), (100.3, 50.7), (14400.0, 10.0), (3.0, 7.0)]:
        for cap in (1000, 28 * 28 * 16, 1_234_567):
            scale = render_scale(w, h, None, 600.0, cap)
            assert np.ceil(w * scale) * np.ceil(h * scale) <= cap


def test_page_ranges(tmp_path):
    assert select_pages("2-3,1,3", 5) == [1, 2, 0]
    assert select_pages("4-", 5) == [3, 4] and select_pages("-2", 5) == [0, 1]
    assert select_pages("7-9", 5) == [] and select_pages(None, 2) == [0, 1]
    path = make_pdf(tmp_path / "a.pdf", pages=4)
    rows = rows_of(path, page_ranges="2,4-")
    assert [r["page_index"] for r in rows] == [1, 3]
    assert ["page 1" in rows[0]["text_layer"], "page 3" in rows[1]["text_layer"]] == [True, True]
    (row,) = rows_of(path, page_ranges="9-")
    assert row["status"] == "error" and "select none" in row["error_message"]


def test_pages_stream_one_at_a_time(tmp_path, monkeypatch):
    path = make_pdf(tmp_path / "long.pdf", pages=300, text=False)
    rendered = []
    real = documents.rasterise_page
    monkeypatch.setattr(
        documents, "rasterise_page", lambda page, *a: rendered.append(page.number) or real(page, *a)
    )
    pages = iter_document_pages(str(path), DocumentConfig(target_longest_side=32))
    first = next(pages)
    assert first["page_index"] == 0 and rendered == [0]
    assert sum(1 for _ in pages) == 299 and len(rendered) == 300


@pytest.mark.parametrize("suffix", ["png", "jpg", "tiff"])
def test_images_are_one_page_documents(tmp_path, suffix):
    path = make_image(tmp_path / f"scan.{suffix}", size=(2000, 1000), index=5)
    (row,) = rows_of(path)
    assert row["status"] == "ok" and row["page_index"] == 0 and row["page_count"] == 1
    assert row["pixels"].shape == (644, 1288, 3)  # shrunk to the target longest side, aspect kept
    assert row["text_layer"] is None and read_index(row["pixels"]) == 5
    small = make_image(tmp_path / f"small.{suffix}", size=(64, 48))
    (row,) = rows_of(small)
    assert row["pixels"].shape == (48, 64, 3)  # never upscaled


def test_transparent_image_sits_on_white(tmp_path):
    path = tmp_path / "clear.png"
    Image.new("RGBA", (40, 30), (0, 0, 0, 0)).save(path)
    (row,) = rows_of(path)
    assert row["pixels"].min() == 255


def test_image_over_the_pixel_limit_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("L", (4000, 3000)).save(path)
    for limit in (10_000_000, 5_000_000):  # under twice the image: our check; over: Pillow's own guard
        (row,) = rows_of(path, max_source_pixels=limit)
        assert row["status"] == "error" and "max_pixels" in row["error_message"]
    (row,) = rows_of(path, max_source_pixels=10_000_000)
    assert (
        row["status"] == "error"
        and "max_pixels" in row["error_message"]
        and str(path) in row["error_message"]
    )


def bad_documents(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (path, fragment the error message must hold)."""
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(b"")
    cut = truncate(make_pdf(tmp_path / "full.pdf", pages=4, object_streams=True), 0.5, tmp_path / "cut.pdf")
    return {
        "empty": (str(empty), "not a readable PDF"),
        "random": (str(make_random_bytes(tmp_path / "random.pdf")), "not a readable PDF"),
        "encrypted": (str(make_pdf(tmp_path / "locked.pdf", password="secret")), "encrypted"),
        "zero pages": (str(make_empty_pdf(tmp_path / "zero.pdf")), "no pages"),
        "truncated": (str(cut), "no pages"),
        "random image": (str(make_random_bytes(tmp_path / "random.png")), "not a readable image"),
        "cut image": (str(truncate(make_image(tmp_path / "i.png", size=(300, 200)), 0.5)), "damaged"),
    }


def _drain(path: str, queue) -> None:
    queue.put([(r["status"], r.get("error_message")) for r in rows_of(path)])


def test_bad_documents_become_one_error_row_each(tmp_path):
    for name, (path, fragment) in bad_documents(tmp_path).items():
        with pytest.raises(DecodeError, match=fragment):
            list(iter_document_pages(path, DocumentConfig()))
        rows = rows_of(path)
        assert len(rows) == 1, name
        row = rows[0]
        assert row["status"] == "error" and row["error_stage"] == "decode" and row["item_id"] == "doc"
        assert path in row["error_message"] and fragment in row["error_message"], row["error_message"]


def test_truncated_pdf_does_not_hang(tmp_path):
    """PyMuPDF opens it with 0 pages, where doc[-1] would spin forever: it must end, as an error row."""
    cut = truncate(make_pdf(tmp_path / "full.pdf", pages=4, object_streams=True), 0.3, tmp_path / "cut.pdf")
    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_drain, args=(str(cut), queue))
    child.start()
    child.join(timeout=30)
    if child.is_alive():
        child.kill()
        pytest.fail("rasterising a truncated PDF hung")
    ((status, message),) = queue.get(timeout=5)
    assert status == "error" and "no pages" in message


def test_broken_xref_is_repaired(tmp_path):
    path = break_xref(make_pdf(tmp_path / "xref.pdf", pages=2))
    rows = rows_of(path)
    assert [r["status"] for r in rows] == ["ok", "ok"] and "page 1" in rows[1]["text_layer"]


def test_one_bad_page_does_not_cost_the_others(tmp_path, monkeypatch):
    path = make_pdf(tmp_path / "a.pdf", pages=3)
    real = documents.rasterise_page

    def failing(page, *args):
        if page.number == 1:
            raise RuntimeError("boom")
        return real(page, *args)

    monkeypatch.setattr(documents, "rasterise_page", failing)
    rows = rows_of(path)
    assert [(r["page_index"], r["status"]) for r in rows] == [(0, "ok"), (1, "error"), (2, "ok")]
    assert str(path) in rows[1]["error_message"] and "page 2" in rows[1]["error_message"]


def test_rasterise_page_directly(tmp_path):
    doc = pymupdf.open(make_pdf(tmp_path / "a.pdf", pages=1, page_size=(100.0, 50.0)))
    pixels, text = rasterise_page(doc[0], target_longest_side=200)
    assert pixels.shape == (100, 200, 3) and pixels.flags.c_contiguous and text is None


def test_pixels_and_text_are_what_pymupdf_gives(tmp_path):
    """One display list serves both the pixels and the text layer: the same as page.get_pixmap() and
    page.get_text(), on cropped, image-only, rotated and annotated pages."""
    path = make_pdf(tmp_path / "a.pdf", pages=4, image_only_pages=(1,), sizes={3: (300.0, 120.0)})
    with pymupdf.open(path) as doc:
        doc[0].set_cropbox(pymupdf.Rect(30, 0, 200, 140))  # cuts through the text
        doc[2].set_rotation(90)
        doc[3].add_freetext_annot(pymupdf.Rect(10, 60, 200, 100), "annotated note", fontsize=10)
        doc.save(tmp_path / "b.pdf")
    with pymupdf.open(tmp_path / "b.pdf") as doc:
        for page in doc:
            pixels, text = rasterise_page(page, 300, with_text=True)
            scale = render_scale(page.rect.width, page.rect.height, 300, None, 28 * 28 * 16384)
            pix = page.get_pixmap(matrix=pymupdf.Matrix(scale, scale), colorspace=pymupdf.csRGB, alpha=False)
            expected = np.frombuffer(pix.samples, np.uint8).reshape(pix.height, pix.width, 3)
            assert np.array_equal(pixels, expected), page.number
            assert text == page.get_text("text"), page.number
        assert "annotated note" in rasterise_page(doc[3], 300, with_text=True)[1]
        assert rasterise_page(doc[2], 300)[0].shape[0] > rasterise_page(doc[2], 300)[0].shape[1]  # rotated


def test_page_pixels_outlive_their_document(tmp_path):
    """Pixels are rendered straight into the row's own array (no copy after MuPDF draws): they must stay
    valid after the pixmap and the document are gone and other pages have been rendered."""
    path = make_pdf(tmp_path / "a.pdf", pages=6, image_only_pages=tuple(range(6)))
    rows = rows_of(path)
    gc.collect()
    rows_of(path)  # fresh pixmaps, which would reuse freed memory
    with pymupdf.open(path) as doc:
        for row, page in zip(rows, doc, strict=True):
            expected, _ = rasterise_page(page)
            assert row["pixels"].shape == expected.shape and np.array_equal(row["pixels"], expected)
            assert read_index(row["pixels"]) == page.number
