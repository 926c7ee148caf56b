"""Finish result rows: parse structured captions, flag cut or failed OCR, stamp model identity and time."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa

from pipeline.prepare import error_fields, result_schema
from schemas import CaptionFields, CaptionRecord, PageRecord


def finish_caption(row: dict[str, Any], json_fields: bool) -> dict[str, Any]:
    """Structured captions: parsed fields and whether they validated; plain ones are left as written."""
    if not json_fields or row["status"] != "ok":
        return row
    fields = CaptionFields.parse(row.get("text") or "")
    row["fields"] = fields.model_dump() if fields is not None else None
    row["fields_valid"] = fields is not None
    return row


def finish_page(row: dict[str, Any], keep_text_layer: bool) -> dict[str, Any]:
    """OCR text stays as the model wrote it; where it failed or was cut, the page's own text is flagged."""
    layer = row.get("text_layer")
    row["has_text_layer"] = bool(layer and layer.strip())
    if row["status"] == "ok":
        row["ocr_truncated"] = row.get("finish_reason") == "length"
    text_missing = row["status"] != "ok" or row.get("ocr_truncated") or not (row.get("text") or "").strip()
    row["used_text_layer"] = bool(text_missing and row["has_text_layer"])
    if not keep_text_layer:
        row["text_layer"] = None
    return row


class Postprocess:
    """Ray Data stage (plain tasks): result rows in, finished rows out, same schema."""

    def __init__(
        self,
        record: type[CaptionRecord] | type[PageRecord],
        model_id: str,
        model_fingerprint: str,
        json_fields: bool = False,
        keep_text_layer: bool = True,
    ):
        self.record, self.schema = record, result_schema(record)
        self.model = {"model_id": model_id, "model_fingerprint": model_fingerprint}
        self.json_fields, self.keep_text_layer = json_fields, keep_text_layer

    def finish(self, row: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
        row.update(self.model, created_at=now)
        try:
            if self.record is CaptionRecord:
                return finish_caption(row, self.json_fields)
            return finish_page(row, self.keep_text_layer)
        except Exception as e:
            return {**row, **error_fields(row.get("uri"), "postprocess", e)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        now = dt.datetime.now(dt.UTC)
        return pa.Table.from_pylist([self.finish(r, now) for r in batch.to_pylist()], schema=self.schema)
