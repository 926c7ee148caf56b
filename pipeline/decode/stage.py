"""The decode stage of a job: a Ray Data callable over item rows that yields each item's unit rows.

`make_decoder` builds the job's decoder (its task's, run in a killable child process); `DecodeUnits`
wraps it so that every item ends in at least one row and the writer can tell when all of an item's rows
have arrived, in whatever order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.decode.supervisor import IsolatedDecoder
from pipeline.faults import DecodeFaults
from pipeline.rows import (
    PIXELS,
    PIXELS_SHAPE,
    UNIT_ORDINAL,
    UNITS_TOTAL,
    RecordModel,
    error_fields,
    stream_schema,
    unit_table,
)


def make_decoder(job: Any, isolated: bool = True) -> Callable[[], Callable]:
    """A picklable factory of the job's decoder (built inside each decode actor).

    Isolated (the default): the decoder runs in one killable child process per decode actor, so a hang or
    a crash costs one item, never the worker. The decode fault drills (`pipeline.faults`) are read here.
    """
    from pipeline.tasks import decode_config, task_of

    factory = task_of(job).decoder(decode_config(job))
    if not isolated:
        return factory
    limits = job.limits
    return functools.partial(
        IsolatedDecoder, factory, limits.decode_timeout_s, limits.decode_retries, DecodeFaults.from_env()
    )


class DecodeUnits:
    """Ray Data stage over item rows: yields each item's unit rows, the last one marked with the count."""

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
        """A decoder row as a stream row: its pixels as one C-order uint8 array and their shape."""
        row = dict(out)
        pixels = row.pop(PIXELS, None)
        if pixels is not None:
            pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
            row[PIXELS], row[PIXELS_SHAPE] = pixels, list(pixels.shape)
        row.setdefault("status", "ok")
        if row["status"] == "ok":
            # The model input size is set by prepare; the decoder's own values would be the rendered size.
            row.pop("width", None), row.pop("height", None)
        return row

    def __call__(self, items: pa.Table) -> Iterator[pa.Table]:
        for item in items.to_pylist():
            for row in self.units(item):
                yield unit_table(row, self.schema)
