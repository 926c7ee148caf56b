"""Finish result rows: the task makes them final (parsed captions, OCR flags); model and time are stamped."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa

from pipeline.rows import error_fields, result_schema
from pipeline.tasks import task_of


class Postprocess:
    """Ray Data stage (plain tasks): result rows in, finished rows out, same schema."""

    def __init__(self, job: Any, model_id: str, model_fingerprint: str):
        self.job, self.task = job, task_of(job)
        self.schema = result_schema(self.task.output_record(job))
        self.model = {"model_id": model_id, "model_fingerprint": model_fingerprint}

    def finish(self, row: dict[str, Any], now: dt.datetime) -> dict[str, Any]:
        row.update(self.model, created_at=now)
        try:
            return self.task.finish(row, self.job)
        except Exception as e:
            return {**row, **error_fields(row.get("uri"), "postprocess", e)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        now = dt.datetime.now(dt.UTC)
        return pa.Table.from_pylist([self.finish(r, now) for r in batch.to_pylist()], schema=self.schema)
