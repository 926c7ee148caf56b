"""Decoded units -> rows the GPU stage takes: pixels at the model's size (uint8), exact token counts."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.rows import (
    COST_COLUMN,
    INPUT_IDS,
    PIXELS,
    PIXELS_SHAPE,
    RecordModel,
    error_fields,
    pixels_at,
    stream_schema,
    to_table,
)


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
