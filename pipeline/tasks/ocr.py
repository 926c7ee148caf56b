"""OCR of documents: the text of every page of every PDF (images are one-page documents)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

from pipeline.tasks.base import Task
from schemas import OcrDocumentsJob, PageRecord


class Ocr(Task):
    kind = "ocr_documents"
    job = OcrDocumentsJob
    record = PageRecord
    inputs = "document"
    unit = "pages"
    unit_key = "page_index"
    sample_shape = (28, 28, 3)

    def decode_config(self, job, budget, model_pixels):
        from pipeline.decode.documents import DocumentConfig

        return DocumentConfig.from_job(job, budget, model_pixels)

    def decoder(self, config):
        from pipeline.decode.documents import RasteriseDocument

        return functools.partial(RasteriseDocument, config)

    def unit_shapes(self, uri: str, config) -> Iterator[tuple[list[int], int]]:
        from pipeline.decode.documents import page_sizes

        for height, width in page_sizes(uri, config):
            yield [height, width, 3], 1

    def finish(self, row: dict[str, Any], job: OcrDocumentsJob) -> dict[str, Any]:
        """OCR text stays as the model wrote it; where it failed or was cut, the text layer is flagged."""
        layer = row.get("text_layer")
        row["has_text_layer"] = bool(layer and layer.strip())
        if row["status"] == "ok":
            row["ocr_truncated"] = row.get("finish_reason") == "length"
        text_missing = (
            row["status"] != "ok" or row.get("ocr_truncated") or not (row.get("text") or "").strip()
        )
        row["used_text_layer"] = bool(text_missing and row["has_text_layer"])
        if not job.keep_text_layer:
            row["text_layer"] = None
        return self.parse_fields(row, job)

    def fields_schema(self, job: OcrDocumentsJob) -> dict[str, Any] | None:
        return job.page_schema
