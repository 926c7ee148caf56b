"""Document rasterise with PyMuPDF: one row per page (RGB at a target size, plus the page's text layer).

PNG/JPEG/TIFF/BMP/WebP files are one-page documents read with Pillow. Pages stream one at a time.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pymupdf
from PIL import Image, ImageOps
from pymupdf import mupdf

from model.pixels import IMAGE_FACTOR, smart_resize
from pipeline.budget import TokenBudget
from pipeline.decode.files import DecodeError, ObjectStream, open_input
from pipeline.decode.shared_memory import output_array
from pipeline.rows import error_row
from schemas.jobs import (
    MAX_PAGES_PER_DOCUMENT,
    MAX_SOURCE_PIXELS,
    PAGE_LONGEST_SIDE,
    PAGE_MAX_PIXELS,
    OcrDocumentsJob,
    parse_page_ranges,
)

IMAGE_EXTENSIONS = frozenset(".png .jpg .jpeg .tif .tiff .bmp .webp".split())
PDF_POINTS_PER_INCH = 72.0

pymupdf.TOOLS.mupdf_display_errors(False)  # damaged files are reported as error rows, not as stderr noise


@dataclass
class DocumentConfig:
    """How pages are rendered, which pages are read, and what a document may cost at most."""

    target_longest_side: int | None = PAGE_LONGEST_SIDE  # pixels; used when dpi is None
    dpi: float | None = None
    max_pixels: int = PAGE_MAX_PIXELS  # per rendered page: the scale is lowered to fit
    page_ranges: str | None = None  # "1-3,7,10-"; None: every page
    keep_text_layer: bool = True
    max_pages: int = MAX_PAGES_PER_DOCUMENT  # selected pages per document
    max_source_pixels: int = MAX_SOURCE_PIXELS  # raster inputs above this are refused (decompression bombs)
    # The model's context: visual tokens one page may take (None: no fit), and the sentence that says why.
    max_visual_tokens: int | None = None
    budget_note: str = ""
    model_pixels: tuple[int, int] | None = None  # (min, max) pixels of the model's own resize

    @classmethod
    def from_job(
        cls,
        job: OcrDocumentsJob,
        budget: TokenBudget | None = None,
        model_pixels: tuple[int, int] | None = None,
        **overrides: Any,
    ) -> DocumentConfig:
        """The rasterise settings of an OCR job; with `budget`, every page is sized to fit the context."""
        values = dict(
            target_longest_side=job.target_longest_side,
            dpi=job.dpi,
            max_pixels=job.max_pixels,
            page_ranges=job.page_ranges,
            keep_text_layer=job.keep_text_layer,
            max_pages=job.limits.max_pages_per_document,
            max_source_pixels=job.limits.max_pixels,
            model_pixels=model_pixels,
        )
        if budget is not None:
            values.update(max_visual_tokens=budget.visual_tokens, budget_note=budget.describe())
        return cls(**{**values, **overrides})

    def fits(self, height: int, width: int) -> bool:
        """Whether a page rendered at height x width stays within the visual-token budget."""
        if self.max_visual_tokens is None:
            return True
        bounds = self.model_pixels or (IMAGE_FACTOR**2, 1 << 62)
        h, w = smart_resize(height, width, IMAGE_FACTOR, *bounds)  # as the prepare stage resizes it
        return (h // IMAGE_FACTOR) * (w // IMAGE_FACTOR) <= self.max_visual_tokens


def fitted_scale(scale: float, width: float, height: float, cfg: DocumentConfig, uri: str) -> float:
    """`scale` lowered until a width x height page (points or pixels) rendered at it fits the context;
    PyMuPDF and the resize below round sides outwards, so sizes are checked rounded up."""
    while not cfg.fits(math.ceil(height * scale), math.ceil(width * scale)):
        if width * scale < 1 or height * scale < 1:
            raise DecodeError(
                f"{uri}: even a one-pixel page does not fit: {cfg.budget_note}; lower "
                "sampling.max_new_tokens or raise max_model_len"
            )
        scale *= 0.98
    return scale


def page_scale(width_pt: float, height_pt: float, cfg: DocumentConfig, uri: str = "") -> float:
    """Pixels per point a page of the job is rendered at: target side or dpi, under max_pixels and the
    model's context (the decode stage and `vlbatch plan` both call this)."""
    if width_pt <= 0 or height_pt <= 0:
        raise ValueError(f"the page has an empty size ({width_pt}x{height_pt} pt)")
    scale = render_scale(width_pt, height_pt, cfg.target_longest_side, cfg.dpi, cfg.max_pixels)
    return fitted_scale(scale, width_pt, height_pt, cfg, uri)


def render_scale(
    width_pt: float, height_pt: float, target_longest_side: int | None, dpi: float | None, max_pixels: int
) -> float:
    """Pixels per point: the target longest side (or dpi), lowered so the rendered page fits max_pixels."""
    if dpi is not None:
        scale = dpi / PDF_POINTS_PER_INCH
    elif target_longest_side is not None:
        scale = target_longest_side / max(width_pt, height_pt)
    else:
        raise ValueError("give target_longest_side or dpi")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1, not {max_pixels}")
    # PyMuPDF rounds the pixel box outwards, so check the rounded-up size, not the exact one.
    while math.ceil(width_pt * scale) * math.ceil(height_pt * scale) > max_pixels:
        scale = min(scale * 0.999, math.sqrt(max_pixels / (width_pt * height_pt)))
    return scale


def _render(display: pymupdf.DisplayList, scale: float) -> np.ndarray:
    """The display list as uint8 RGB on white, rendered straight into an `output_array`: what
    `DisplayList.get_pixmap(matrix, csRGB, alpha=False)` gives, made where the row travels from (in the
    decode child, the shared memory it is sent in), so no copy of the page follows."""
    matrix = mupdf.FzMatrix(scale, 0, 0, scale, 0, 0)
    box = mupdf.fz_round_rect(mupdf.fz_transform_rect(mupdf.fz_bound_display_list(display.this), matrix))
    width, height = box.x1 - box.x0, box.y1 - box.y0
    if width <= 0 or height <= 0:
        raise ValueError(f"the page renders to {width}x{height} pixels")
    pixels = output_array((height, width, 3), np.uint8)
    samples = mupdf.python_mutable_buffer_data(memoryview(pixels).cast("B"))
    pix = mupdf.fz_new_pixmap_with_bbox_and_data(pymupdf.csRGB.this, box, mupdf.FzSeparations(), 0, samples)
    mupdf.fz_clear_pixmap_with_value(pix, 0xFF)
    device = mupdf.fz_new_draw_device(matrix, pix)
    try:
        everywhere = mupdf.FzRect(mupdf.FzRect.Fixed_INFINITE)
        mupdf.fz_run_display_list(display.this, device, mupdf.FzMatrix(), everywhere, mupdf.FzCookie())
    finally:
        mupdf.fz_close_device(device)
    return pixels


def rasterise_page(
    page: pymupdf.Page,
    target_longest_side: int | None = PAGE_LONGEST_SIDE,
    dpi: float | None = None,
    max_pixels: int = PAGE_MAX_PIXELS,
    with_text: bool = False,
    scale: float | None = None,
) -> tuple[np.ndarray, str | None]:
    """(uint8 HxWx3 RGB of a page, its text layer or None); the scale is fixed before rendering, so a huge
    page never renders huge.

    The page is interpreted once, into a display list that both the rasteriser and the text extraction
    replay (`page.get_text()` would interpret the page a second time). Pixels and text are what
    `page.get_pixmap()` and `page.get_text("text")` give.
    """
    rect = page.rect
    if rect.width <= 0 or rect.height <= 0:
        raise ValueError(f"page {page.number + 1} has an empty size ({rect.width}x{rect.height} pt)")
    if scale is None:
        scale = render_scale(rect.width, rect.height, target_longest_side, dpi, max_pixels)
    display = page.get_displaylist()
    pixels = _render(display, scale)
    text = None
    if with_text:
        text = pymupdf.TextPage(display.get_textpage(pymupdf.TEXTFLAGS_TEXT)).extractText()
    return pixels, text


def select_pages(spec: str | None, page_count: int) -> list[int]:
    """0-based indices of the pages a range spec selects, in order, each once, all < page_count."""
    if spec is None:
        return list(range(page_count))
    picked: dict[int, None] = {}
    for first, last in parse_page_ranges(spec):
        end = page_count if last is None else min(last, page_count)
        for number in range(first, end + 1):
            picked[number - 1] = None
    return list(picked)


def image_target_size(width: int, height: int, cfg: DocumentConfig, uri: str = "") -> tuple[int, int]:
    """(height, width) a raster image of width x height (after EXIF rotation) is given to the model."""
    scale = 1.0
    if cfg.dpi is None and cfg.target_longest_side is not None:
        scale = min(1.0, cfg.target_longest_side / max(width, height))
    if (width * scale) * (height * scale) > cfg.max_pixels:
        scale = math.sqrt(cfg.max_pixels / (width * height))
    scale = fitted_scale(scale, width, height, cfg, uri)
    if scale >= 1.0:
        return height, width
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def _image_page(source: str | ObjectStream, uri: str, cfg: DocumentConfig) -> np.ndarray:
    """RGB of a raster file: alpha on white, EXIF rotation applied, downscaled to the target longest side
    (never upscaled: that adds no detail) and capped by max_pixels."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        # Pillow's own guard follows the job's limit (it refuses at twice it; the check below at once).
        Image.MAX_IMAGE_PIXELS = cfg.max_source_pixels
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except Image.DecompressionBombError as e:
        raise DecodeError(
            f"{uri}: image over limits.max_pixels (a decompression bomb?); raise the limit if it is genuine"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DecodeError(f"{uri}: not a readable image ({e})") from e
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    with image:
        width, height = image.size
        if width * height > cfg.max_source_pixels:
            raise DecodeError(
                f"{uri}: image of {width}x{height} exceeds limits.max_pixels={cfg.max_source_pixels} "
                "(a decompression bomb?); raise the limit if it is genuine"
            )
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                background = Image.new("RGB", image.size, (255, 255, 255))
                background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
                image = background
            image = image.convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt pixel data
            raise DecodeError(f"{uri}: image data is damaged ({e})") from e
        height, width = image_target_size(image.width, image.height, cfg, uri)
        if (width, height) != image.size:
            image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
        return np.asarray(image)


def _is_image(uri: str) -> bool:
    return os.path.splitext(uri.split("?", 1)[0])[1].lower() in IMAGE_EXTENSIONS


def _open_pdf(path: str, uri: str) -> pymupdf.Document:
    # A .pdf is read as PDF whatever its bytes; other names (XPS, EPUB, GIF ... given explicitly) are sniffed.
    filetype = "pdf" if path.lower().endswith(".pdf") else None
    try:
        doc = pymupdf.open(path, filetype=filetype)
    except Exception as e:  # FileDataError, RuntimeError, EmptyFileError: all mean "cannot be read"
        raise DecodeError(f"{uri}: not a readable PDF ({e}); the file is damaged or not a PDF") from e
    if doc.needs_pass:
        doc.close()
        raise DecodeError(
            f"{uri}: the PDF is encrypted with a password; decrypt it (e.g. qpdf --decrypt) first"
        )
    if doc.page_count <= 0:
        # Also what a truncated PDF looks like; asking such a document for doc[-1] spins forever.
        doc.close()
        raise DecodeError(f"{uri}: the PDF has no pages (truncated or damaged?)")
    return doc


def page_sizes(uri: str, cfg: DocumentConfig) -> list[tuple[int, int]]:
    """Rendered (height, width) of each selected page, from page boxes or image headers; nothing is
    rendered (`vlbatch plan`). Raises DecodeError as the decode stage would."""
    if _is_image(uri):
        with open_input(uri, stream="always") as source:  # only the image's header is read
            try:
                with Image.open(source) as image:
                    width, height = image.size
                    if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotation by 90 degrees
                        width, height = height, width
            except (OSError, SyntaxError, ValueError) as e:
                raise DecodeError(f"{uri}: not a readable image ({e})") from e
            if width * height > cfg.max_source_pixels:
                raise DecodeError(f"{uri}: image of {width}x{height} exceeds limits.max_pixels")
            return [image_target_size(width, height, cfg, uri)]
    with open_input(uri) as path, _open_pdf(path, uri) as doc:
        pages = select_pages(cfg.page_ranges, doc.page_count)
        if not pages or len(pages) > cfg.max_pages:
            raise DecodeError(f"{uri}: {len(pages)} pages selected (limit {cfg.max_pages})")
        sizes = []
        for index in pages:
            rect = doc.load_page(index).rect
            scale = page_scale(rect.width, rect.height, cfg, uri)
            box = (rect * pymupdf.Matrix(scale, scale)).irect  # the pixel box get_pixmap renders
            sizes.append((box.height, box.width))
        return sizes


def iter_document_pages(uri: str, cfg: DocumentConfig) -> Iterator[dict[str, Any]]:
    """One row per selected page, rendered one at a time; a page that fails is an error row of its own.

    Raises DecodeError (naming the file) when the document as a whole cannot be read or is over a limit.
    """
    started = time.perf_counter()
    if _is_image(uri):
        if not select_pages(cfg.page_ranges, 1):
            raise DecodeError(
                f"{uri}: page_ranges {cfg.page_ranges!r} skip page 1, the only page of an image"
            )
        with open_input(uri, stream="always") as source:  # Pillow reads a stream; no copy on disk
            pixels = _image_page(source, uri, cfg)
        yield _page_row(uri, 0, 1, pixels, None, None, None, cfg, started)
        return
    with open_input(uri) as path:  # PyMuPDF needs the whole file
        doc = _open_pdf(path, uri)
        with doc:
            count = doc.page_count
            pages = select_pages(cfg.page_ranges, count)
            if not pages:
                raise DecodeError(f"{uri}: page_ranges {cfg.page_ranges!r} select none of its {count} pages")
            if len(pages) > cfg.max_pages:
                raise DecodeError(
                    f"{uri}: {len(pages)} pages selected, over limits.max_pages_per_document={cfg.max_pages}"
                )
            for index in pages:
                assert 0 <= index < count  # never negative, never past the end (see _open_pdf)
                try:
                    page = doc.load_page(index)
                    scale = page_scale(page.rect.width, page.rect.height, cfg, uri)
                    pixels, text = rasterise_page(
                        page, cfg.target_longest_side, cfg.dpi, cfg.max_pixels, cfg.keep_text_layer, scale
                    )
                    row = _page_row(
                        uri, index, count, pixels, text, page.rect.width, page.rect.height, cfg, started
                    )
                except Exception as e:  # one bad page must not cost the others
                    row = error_row(
                        {"uri": uri},
                        "decode",
                        DecodeError(f"{uri}: page {index + 1}: {e}"),
                        page_index=index,
                        page_number=index + 1,
                        page_count=count,
                    )
                yield row
                started = time.perf_counter()


def _page_row(
    uri: str,
    index: int,
    count: int,
    pixels: np.ndarray,
    text: str | None,
    width_pt: float | None,
    height_pt: float | None,
    cfg: DocumentConfig,
    started: float,
) -> dict[str, Any]:
    return {
        "uri": uri,
        "status": "ok",
        "page_index": index,
        "page_number": index + 1,
        "page_count": count,
        "pixels": pixels,
        "height": int(pixels.shape[0]),
        "width": int(pixels.shape[1]),
        "page_width_pt": width_pt,
        "page_height_pt": height_pt,
        "text_layer": text,
        "has_text_layer": bool(text and text.strip()) if text is not None else None,
        "decode_s": time.perf_counter() - started,
    }


class RasteriseDocument:
    """Ray Data flat_map stage: an item row in, one row per page out; a failure becomes an error row."""

    def __init__(self, cfg: DocumentConfig):
        self.cfg = cfg

    def __call__(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            for out in iter_document_pages(row["uri"], self.cfg):
                yield {**row, **out}
        except Exception as e:  # every input is accounted for: a bad file is a row, not a dead job
            yield error_row(row, "decode", e, page_index=None)
