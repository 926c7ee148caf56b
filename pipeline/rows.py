"""The row contract: the columns rows carry between stages, their Arrow schemas, and the one error row.

Rows between stages have one Arrow schema per job kind (`stream_schema`): the output record's fields plus
a few internal columns that never reach the Parquet files. Explicit schemas keep blocks that hold only
error rows (no pixels) concatenable with the others. Decoders emit rows in these terms already (record
field names, `pixels`), so no stage renames a column.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from schemas import RecordBase, arrow_schema

PIXELS = "pixels"  # uint8 C-order bytes: [T, H, W, 3] video frames or [H, W, 3] page image, final size
PIXELS_SHAPE = "pixels_shape"
INPUT_IDS = "input_ids"  # the prompt, every vision pad expanded
COST_COLUMN = "cost_tokens"  # visual + prompt tokens of a row, what the packer's budget counts
BUSY_S = "busy_s"  # seconds a GPU worker spent on a pack; on the pack's first row only, for throughput
UNIT_ORDINAL = "unit_ordinal"  # 0..n-1 within an item, whatever its window / page numbers
UNITS_TOTAL = "units_total"  # on the last row of an item (set by the decode stage): how many it has

RecordModel = type[RecordBase]


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
    # Column by column: Table.from_pylist has a fixed cost per call that dominates one-row tables.
    columns = [pa.array([r.get(f.name) for r in rows], type=f.type) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


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


def pixels_at(table: pa.Table, i: int) -> np.ndarray | None:
    """Row i's pixels as a read-only uint8 array, without copying the bytes."""
    value = table.column(PIXELS)[i]
    if not value.is_valid:
        return None
    shape = table.column(PIXELS_SHAPE)[i].as_py()
    return np.frombuffer(value.as_buffer(), dtype=np.uint8).reshape(shape)


def error_message(uri: str | None, error: BaseException | str) -> str:
    """What an error row says: the file first, then the problem. A ValueError's text is meant for the user
    (it names the setting or the fix); any other exception keeps its type, as it is likely a bug."""
    if isinstance(error, str):
        text = error
    elif isinstance(error, ValueError):
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error}"
    return text if uri and uri in text else f"{uri}: {text}"


def error_fields(uri: str | None, stage: str, error: BaseException | str) -> dict[str, Any]:
    """The columns that make a row an error row of `stage`."""
    return {"status": "error", "error_stage": stage, "error_message": error_message(uri, error)}


def error_row(row: dict[str, Any], stage: str, error: BaseException | str, **fields: Any) -> dict[str, Any]:
    """`row` (an item, or one of its windows or pages) as the error row it becomes where `stage` failed."""
    return {**row, **error_fields(row.get("uri"), stage, error), **fields}
