"""Decoded units -> rows the GPU stage takes: accounted for, pixels as uint8 bytes, exact token counts.

Rows between stages have one Arrow schema per job kind (`stream_schema`): the output record's fields plus
a few internal columns that never reach the Parquet files. Explicit schemas keep blocks that hold only
error rows (no pixels) concatenable with the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.packing import COST_COLUMN
from pipeline.writer import UNITS_TOTAL
from schemas import CaptionRecord, PageRecord, arrow_schema

PIXELS = "pixels"  # uint8 C-order bytes: [T, H, W, 3] video frames or [H, W, 3] page image, final size
PIXELS_SHAPE = "pixels_shape"
INPUT_IDS = "input_ids"  # the prompt, every vision pad expanded
BUSY_S = "busy_s"  # seconds a GPU worker spent on a pack; on the pack's first row only, for throughput
UNIT_ORDINAL = "unit_ordinal"  # 0..n-1 within an item, whatever its window / page numbers

RecordModel = type[CaptionRecord] | type[PageRecord]


def unit_key(record: RecordModel) -> str:
    """The record column that numbers an item's windows / pages (None for a failure of the whole item)."""
    return "window_index" if record is CaptionRecord else "page_index"


def result_schema(record: RecordModel) -> pa.Schema:
    """Rows after the GPU stage: the record plus the unit accounting and busy time."""
    schema = arrow_schema(record)
    for f in (
        pa.field(UNIT_ORDINAL, pa.int64()),
        pa.field(UNITS_TOTAL, pa.int64()),
        pa.field(BUSY_S, pa.float64()),
    ):
        schema = schema.append(f)
    return schema


def stream_schema(record: RecordModel) -> pa.Schema:
    """Rows before the GPU stage: results plus pixels, prompt ids and packing cost."""
    schema = result_schema(record)
    for f in (
        pa.field(PIXELS, pa.large_binary()),
        pa.field(PIXELS_SHAPE, pa.list_(pa.int64())),
        pa.field(INPUT_IDS, pa.list_(pa.int32())),
        pa.field(COST_COLUMN, pa.int64()),
    ):
        schema = schema.append(f)
    return schema


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows as a table of `schema`; keys outside the schema are dropped, missing ones are null."""
    # Column by column: Table.from_pylist costs about a millisecond per call, whatever the row count.
    columns = [pa.array([r.get(f.name) for r in rows], type=f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def pixels_at(table: pa.Table, i: int) -> np.ndarray | None:
    """Row i's pixels as a read-only uint8 array, without copying the bytes."""
    value = table.column(PIXELS)[i]
    if not value.is_valid:
        return None
    shape = table.column(PIXELS_SHAPE)[i].as_py()
    return np.frombuffer(value.as_buffer(), dtype=np.uint8).reshape(shape)


def with_uri(uri: str | None, message: str) -> str:
    """Messages of error rows name the file."""
    return message if uri and uri in message else f"{uri}: {message}"


def error_fields(uri: str | None, stage: str, error: BaseException | str) -> dict[str, Any]:
    text = (
        error
        if isinstance(error, str)
        else (str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}")
    )
    return {"status": "error", "error_stage": stage, "error_message": with_uri(uri, text)}


class DecodeUnits:
    """Ray Data stage over item rows: yields each item's unit rows, the last one marked with the count.

    Wraps a decoder (row -> iterator of unit dicts, e.g. `DecodeVideo`) so that every item ends in at least
    one row and the writer can tell when all of an item's rows have arrived, in whatever order.
    """

    def __init__(self, make_decoder: Callable[[], Callable], record: RecordModel, job_id: str):
        self.decode = make_decoder()
        self.schema = stream_schema(record)
        self.job_id = job_id

    def units(self, item: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The unit rows of one item, in order, the last one carrying UNITS_TOTAL."""
        base = {"item_id": item["item_id"], "uri": item["uri"], "job_id": self.job_id}
        held: dict[str, Any] | None = None
        count = 0
        try:
            for out in self.decode(dict(item)):
                if held is not None:
                    yield held
                held = {**self.convert(out), **base, UNIT_ORDINAL: count}
                count += 1
        except Exception as e:  # the decoder's own guard failed: still one row per unit, never a lost item
            if held is not None:
                yield held
            held = {**base, **error_fields(item["uri"], "decode", e), UNIT_ORDINAL: count}
            count += 1
        if held is None:
            held = {
                **base,
                **error_fields(item["uri"], "decode", "the decoder produced no rows"),
                UNIT_ORDINAL: 0,
            }
            count = 1
        held[UNITS_TOTAL] = count
        yield held

    @staticmethod
    def convert(out: dict[str, Any]) -> dict[str, Any]:
        """A decoder row in stream terms: pixels as one uint8 array; decoder names to record names."""
        row = dict(out)
        pixels = row.pop("frames", None)
        if pixels is None:
            pixels = row.pop("image", None)
        if pixels is not None:
            pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
            row[PIXELS], row[PIXELS_SHAPE] = pixels, list(pixels.shape)
        if "timestamps" in row and "frame_timestamps" not in row:
            row["frame_timestamps"] = row.pop("timestamps")
        if "text" in row and "text_layer" not in row:
            row["text_layer"] = row.pop("text")  # a decoder's "text" is the document's own text
        row.pop("text", None)
        row.setdefault("status", "ok")
        if row["status"] == "ok":
            # The model input size is set by prepare; the decoder's own values would be the rendered size.
            row.pop("width", None), row.pop("height", None)
        return row

    def __call__(self, items: pa.Table) -> Iterator[pa.Table]:
        for item in items.to_pylist():
            for row in self.units(item):
                yield unit_table(row, self.schema)


def unit_table(row: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """One row as a table; its pixel array becomes the binary value without a copy."""
    pixels = row.pop(PIXELS, None)
    table = to_table([row], schema.remove(schema.get_field_index(PIXELS)))
    if pixels is None:
        column = pa.nulls(1, pa.large_binary())
    else:
        offsets = pa.py_buffer(np.array([0, pixels.nbytes], dtype=np.int64))
        column = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(pixels)])
    return table.append_column(schema.field(PIXELS), column).select(schema.names)


def messages_for(
    visual: dict[str, Any], prompt: str, system_prompt: str | None = None
) -> list[dict[str, Any]]:
    """The chat of one unit: optional system turn, then the video or page image followed by the prompt."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": [visual, {"type": "text", "text": prompt}]})
    return messages


def visual_item(shape: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """A pixel-free content item of a given size, for counting tokens."""
    if len(shape) == 4:
        return {"type": "video", "num_frames": shape[0], "height": shape[1], "width": shape[2]}
    return {"type": "image", "height": shape[0], "width": shape[1]}


class Prepare:
    """Ray Data stage: resize pages to the model's size, count exact visual and prompt tokens, keep uint8."""

    def __init__(self, model_path: str, record: RecordModel, prompt: str, system_prompt: str | None = None):
        from model.processor import Processor

        self.processor = Processor.from_pretrained(model_path)
        self.schema = stream_schema(record)
        self.prompt, self.system_prompt = prompt, system_prompt

    def prepare_row(self, row: dict[str, Any], pixels: np.ndarray | None) -> tuple[dict[str, Any], Any]:
        """(row with counts, replacement pixels or None to keep the row's bytes as they are)."""
        started = time.perf_counter()
        if row["status"] != "ok":
            return row, None
        new_pixels = None
        try:
            if pixels is None:
                raise ValueError("the decoder returned no pixels")
            ip = self.processor.image_processor
            height, width = pixels.shape[-3], pixels.shape[-2]
            target = ip.resized_size(height, width)
            if target != (height, width):  # pages render at a target side; the model wants multiples of 28
                resized = ip.resize_video(pixels) if pixels.ndim == 4 else ip.resize_image(pixels)
                new_pixels, row[PIXELS_SHAPE] = resized.tobytes(), list(resized.shape)
                height, width = target
            shape = row[PIXELS_SHAPE]
            prompt = self.processor.count_tokens(
                messages_for(visual_item(shape), self.prompt, self.system_prompt)
            )
        except Exception as e:
            return {**row, **error_fields(row.get("uri"), "prepare", e), PIXELS_SHAPE: None}, b""
        row.update(
            width=width,
            height=height,
            prompt_tokens=prompt.text_tokens,
            visual_tokens=prompt.visual_tokens,
            **{INPUT_IDS: prompt.input_ids, COST_COLUMN: prompt.num_tokens},
        )
        row["decode_s"] = (row.get("decode_s") or 0.0) + time.perf_counter() - started
        return row, new_pixels

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, replaced = [], {}
        for i, row in enumerate(batch.drop_columns([PIXELS]).to_pylist()):
            out, new_pixels = self.prepare_row(row, pixels_at(batch, i))
            rows.append(out)
            if new_pixels is not None:
                replaced[i] = new_pixels or None  # b"": the row failed, its pixels go
        table = to_table(rows, self.schema.remove(self.schema.get_field_index(PIXELS)))
        pixels = batch.column(PIXELS)
        if replaced:
            original = pixels.to_pylist()
            pixels = pa.array([replaced.get(i, v) for i, v in enumerate(original)], type=pa.large_binary())
        return table.append_column(self.schema.field(PIXELS), pixels).select(self.schema.names)
