"""`_manifest.json` in the output directory: the spec, the model, what the output holds, and every run."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.rows import BUSY_S
from pipeline.storage import OutputDir
from pipeline.tasks import task_of
from pipeline.writer import MANIFEST_NAME, part_files, read_json, write_json_atomic
from schemas import SCHEMA_VERSION, JobBase

MAX_LISTED_ERRORS = 100
PAST_RUNS_KEPT = 19  # the manifest lists this many earlier runs, and this one


@dataclass
class RunStats:
    """What this run produced, counted as rows reach the driver."""

    units: int = 0
    ok: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    visual_tokens: int = 0
    generated_tokens: int = 0
    busy_s: float = 0.0
    repeats: int = 0  # unit rows that arrived again (a retried task redid them) and were dropped

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.units += 1
            if row["status"] == "ok":
                self.ok += 1
            else:
                self.errors += 1
            self.prompt_tokens += row.get("prompt_tokens") or 0
            self.visual_tokens += row.get("visual_tokens") or 0
            self.generated_tokens += row.get("generated_tokens") or 0
            self.busy_s += row.get(BUSY_S) or 0.0


def dataset_totals(out_dir: OutputDir, unit_key: str) -> tuple[dict, list[dict]]:
    """Counts and token sums over every committed row, and the first error rows."""
    sums = ("prompt_tokens", "visual_tokens", "generated_tokens")
    if not part_files(out_dir):
        return {"items": 0, "units": 0, "ok": 0, "errors": 0, **dict.fromkeys(sums, 0)}, []
    columns = ["item_id", "uri", "status", unit_key, "error_stage", "error_message", *sums]
    table = pads.dataset(out_dir.path, filesystem=out_dir.fs, format="parquet").to_table(columns=columns)
    errors = table.filter(pc.equal(table.column("status"), "error"))
    totals = {
        "items": len(pc.unique(table.column("item_id"))),
        "units": table.num_rows,
        "ok": table.num_rows - errors.num_rows,
        "errors": errors.num_rows,
        **{name: int(pc.sum(table.column(name)).as_py() or 0) for name in sums},
    }
    listed = [
        {
            "uri": r["uri"],
            "item_id": r["item_id"],
            unit_key: r[unit_key],
            "stage": r["error_stage"],
            "message": r["error_message"],
        }
        for r in errors.slice(0, MAX_LISTED_ERRORS).to_pylist()
    ]
    return totals, listed


def output_counts(job: JobBase, totals: dict[str, Any]) -> dict[str, int]:
    """The manifest's counts of what the output holds."""
    names = {"items": "items", task_of(job).unit: "units", "ok": "ok", "errors": "errors"}
    return {name: totals[key] for name, key in names.items()}


class Manifest:
    """The manifest of one run over an output: written when the run starts, updated when it ends."""

    def __init__(
        self, out_dir: OutputDir, job: JobBase, job_id: str, model_path: str, model: tuple[str, str]
    ):
        self.path = out_dir.uri(MANIFEST_NAME)
        previous: dict = read_json(self.path) or {}
        self.data: dict[str, Any] = {
            "job_id": job_id,
            "kind": job.kind,
            "status": "running",
            "schema_version": SCHEMA_VERSION,
            "record": task_of(job).record.__name__,
            "spec": job.model_dump(mode="json"),
            "model": {"path": model_path, "id": model[0], "fingerprint": model[1]},
            "started_at": dt.datetime.now(dt.UTC).isoformat(),
            "runs": list(previous.get("runs", []))[-PAST_RUNS_KEPT:],
        }

    def save(self, **fields: Any) -> None:
        self.data.update(fields)
        write_json_atomic(self.path, self.data)

    def run_record(
        self, job: JobBase, items: list, todo: list, run: RunStats, started: float
    ) -> dict[str, Any]:
        """One entry of the manifest's `runs`: what this run did, finished or not."""
        wall_s = time.perf_counter() - started
        return {
            "job_id": self.data["job_id"],
            "started_at": self.data["started_at"],
            "finished_at": dt.datetime.now(dt.UTC).isoformat(),
            "items": len(items),
            "items_skipped": len(items) - len(todo),
            "items_processed": len(todo),
            task_of(job).unit: run.units,
            "ok": run.ok,
            "errors": run.errors,
            "prompt_tokens": run.prompt_tokens,
            "visual_tokens": run.visual_tokens,
            "generated_tokens": run.generated_tokens,
            "wall_s": round(wall_s, 3),
            "repeats_dropped": run.repeats,
            "gpu_busy_s": round(run.busy_s, 3),
            "generated_tokens_per_s": round(run.generated_tokens / wall_s, 3) if wall_s > 0 else 0.0,
            # per second of generate() time summed over GPU workers: compare with an engine's own benchmark
            "generated_tokens_per_busy_s": round(run.generated_tokens / run.busy_s, 3) if run.busy_s else 0.0,
        }

    def end(self, job: JobBase, out_dir: OutputDir, run_entry: dict[str, Any], **fields: Any) -> dict:
        """Record the run's end (its entry in `runs`, what the output holds now); returns the totals."""
        totals, errors = dataset_totals(out_dir, task_of(job).unit_key)
        self.save(
            runs=[*self.data["runs"], run_entry],
            counts=output_counts(job, totals),
            tokens={k: totals[k] for k in ("prompt_tokens", "visual_tokens", "generated_tokens")},
            errors=errors,
            errors_truncated=totals["errors"] > len(errors),
            **fields,
        )
        return totals
