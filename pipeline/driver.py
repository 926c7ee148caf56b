"""The driver of a job: what is left to do, the stream of results, exactly-once commits, the manifest.

Ray connects only when there is work: a rerun over a finished output touches nothing but the manifest.
Items whose rows did not all come back (a worker failed on them for good) become one error row each, which
the next run redoes.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.attempts import start_ledger
from pipeline.budget import gpu_layout
from pipeline.chain import build_dataset
from pipeline.infer import model_identity
from pipeline.lock import OutputLock
from pipeline.manifest import Manifest, RunStats
from pipeline.progress import ProgressLine, configure_ray_data_output
from pipeline.rows import UNIT_ORDINAL, error_fields
from pipeline.sources import Item, expand_inputs
from pipeline.storage import OutputDir
from pipeline.tasks import task_of
from pipeline.writer import DatasetWriter, check_same_fields, drop_items, remove_partial_files, scan_output
from schemas import JobBase, arrow_schema

log = logging.getLogger(__name__)


def new_job_id(job: JobBase) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return job.job_id or f"{job.kind}-{stamp}-{secrets.token_hex(3)}"


@dataclass
class JobSummary:
    """The end of a run: this run's work, and what the whole output holds now."""

    job_id: str
    kind: str
    output: str
    unit: str  # windows or pages
    items: int  # items in the inputs
    items_skipped: int  # already done in the output
    items_processed: int
    run: RunStats
    wall_s: float
    totals: dict[str, Any] = field(default_factory=dict)
    finished: bool = True

    @property
    def generated_tokens_per_s(self) -> float:
        return self.run.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def line(self) -> str:
        r, t = self.run, self.totals
        return (
            f"vlbatch {self.kind}: {self.items} items ({self.items_skipped} already done, "
            f"{self.items_processed} run), {r.units} {self.unit}: {r.ok} ok, {r.errors} errors | "
            f"tokens prompt {r.prompt_tokens:,} visual {r.visual_tokens:,} "
            f"generated {r.generated_tokens:,} | {self.generated_tokens_per_s:.1f} generated tok/s | "
            f"{self.wall_s:.1f} s | output {self.output}: "
            f"{t.get('items', 0)} items, {t.get('units', 0)} {self.unit}, {t.get('errors', 0)} errors"
        )


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: what is committed stays, and rerunning the same command finishes the job."""

    def __init__(self, output: Path, items_done: int, items: int):
        super().__init__(f"{output}: {items_done} of {items} items committed")
        self.output, self.items_done, self.items = output, items_done, items


class JobStalled(RuntimeError):
    """No stage took or produced a block for `limits.no_progress_timeout_s`: what is committed stays, and
    rerunning the same job goes on from there once the cluster can run it."""

    def __init__(self, timeout_s: float, stages: str, output: str = "", items_done: int = 0, items: int = 0):
        super().__init__(f"no stage made progress for {timeout_s:.0f} s (limits.no_progress_timeout_s)")
        self.timeout_s, self.stages = timeout_s, stages
        self.output, self.items_done, self.items = output, items_done, items

    def advice(self) -> str:
        """What the user reads: what happened, what is kept, what to do."""
        return (
            f"{self}; {self.items_done} of {self.items} items are committed in {self.output}. A node was "
            "probably lost and what the job needs (a GPU, a worker's CPUs) did not come back, or a worker "
            "hangs. Run the same command again once the cluster has the resources, or raise "
            "limits.no_progress_timeout_s if loading the model on the GPU stage or a new node joining takes "
            f"longer than that.{self.stages}"
        )


def item_error_row(item: Item, job_id: str, unit_key: str, message: str) -> dict[str, Any]:
    """The single row of an item whose results did not all come back (redone by the next run)."""
    return {
        "item_id": item.item_id,
        "uri": item.uri,
        "job_id": job_id,
        unit_key: None,
        UNIT_ORDINAL: 0,
        **error_fields(item.uri, "pipeline", message),
    }


@storage.with_job_storage
def run_job(
    job: JobBase, progress: bool = True, connect: Callable[[], None] | None = None, verbose: bool = False
) -> JobSummary:
    """Run `job` over every input not already done in its output; returns the summary (also printed).

    `progress`: a progress line; `verbose`: Ray Data's own progress bars and log lines instead."""
    started = time.perf_counter()
    task = task_of(job)
    items = expand_inputs(job.inputs, task.inputs)  # a missing input fails here, before any work
    model = model_identity(job.model)
    problem = gpu_layout(job).problem()  # a model that cannot fit its GPUs fails here, not in every worker
    if problem:
        raise ValueError(problem)
    out_dir = OutputDir.of(job.output)
    if out_dir.local and Path(out_dir.path).exists() and not Path(out_dir.path).is_dir():
        raise ValueError(
            f"{out_dir}: the output must be a directory (Parquet files + manifest), but this is a file; "
            "choose another --out / output"
        )
    job_id = new_job_id(job)
    with OutputLock(out_dir):
        remove_partial_files(out_dir)
        state = scan_output(out_dir, uri_key="uri")
        check_same_fields(state, arrow_schema(task.output_record(job)))
        todo = [it for it in items if it.item_id not in state.ok_items]
        # Items with error rows are redone; so are older versions of a file that changed since.
        wanted = {it.uri: it.item_id for it in todo}
        redo = {i for uri, ids in state.item_ids_by_uri.items() if uri in wanted for i in ids}
        drop_items(state, redo)
        manifest = Manifest(out_dir, job, job_id, job.model, model)
        manifest.save()
        run = RunStats()
        if todo:
            try:
                if connect is not None:
                    connect()
                execute(job, todo, job_id, model, out_dir, progress, verbose, run)
            except BaseException as e:  # what was committed stays valid; the next run finishes the rest
                interrupted = isinstance(e, KeyboardInterrupt)
                status = "interrupted" if interrupted else "failed"
                error = "interrupted (Ctrl-C or SIGINT)" if interrupted else f"{type(e).__name__}: {e}"[:2000]
                entry = {**manifest.run_record(job, items, todo, run, started), "status": status}
                totals = manifest.end(job, out_dir, entry, status=status, error=error)
                if interrupted:
                    raise JobInterrupted(out_dir, totals["items"], len(items)) from None
                if isinstance(e, JobStalled):  # raised again with what the run committed, as Ctrl-C is
                    done = totals["items"]
                    raise JobStalled(e.timeout_s, e.stages, str(out_dir), done, len(items)) from None
                raise
        finished = {it.item_id for it in items} <= scan_output(out_dir, uri_key="uri").items
        status = "finished" if finished else "incomplete"
        entry = {**manifest.run_record(job, items, todo, run, started), "status": status}
        totals = manifest.end(job, out_dir, entry, status=status, finished_at=entry["finished_at"], run=entry)
        summary = JobSummary(
            job_id=job_id,
            kind=job.kind,
            output=str(out_dir),
            unit=task.unit,
            items=len(items),
            items_skipped=len(items) - len(todo),
            items_processed=len(todo),
            run=run,
            wall_s=time.perf_counter() - started,
            totals=totals,
            finished=finished,
        )
    print(summary.line(), flush=True)
    return summary


def execute(
    job: JobBase,
    todo: list[Item],
    job_id: str,
    model: tuple[str, str],
    out_dir: OutputDir,
    progress: bool,
    verbose: bool = False,
    run: RunStats | None = None,
) -> RunStats:
    """Stream the dataset into the writer, counting into `run`; items whose rows did not all arrive become
    one error row."""
    import ray
    from ray.data import DataContext
    from ray.data.exceptions import ExecutionTimeoutError

    task = task_of(job)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress and verbose
    configure_ray_data_output(verbose)
    ctx.execution_options.preserve_order = False
    # A block that fails for good (a batch whose retries are spent, a block lost with its node) must not end
    # the job: its items are missing at the end of the stream and run again in a further pass
    # (limits.lost_item_passes); those still missing become error rows, which the next run redoes.
    ctx.max_errored_blocks = -1
    # Ray's own guard: the executor fails once no operator has taken or produced a block for this long (a
    # restarted actor waiting for a lost node's GPU waits forever otherwise).
    ctx.execution_no_progress_timeout_s = job.limits.no_progress_timeout_s
    run = run if run is not None else RunStats()
    line = ProgressLine(job.kind, len(todo), task.unit) if progress and not verbose else None
    writer = DatasetWriter(
        out_dir,
        arrow_schema(task.output_record(job)),
        item_key="item_id",
        unit_key=UNIT_ORDINAL,
        rows_per_file=job.limits.rows_per_file,
        flush_every_s=job.limits.commit_every_s,
        on_item=run.add if line is None else lambda rows: (run.add(rows), line.item(rows)),
    )
    missing = todo
    ledger = start_ledger(job.limits.infer_retries)
    given_up: dict[str, int] = {}
    try:
        for attempt in range(1 + job.limits.lost_item_passes):
            if attempt:
                log.warning(
                    "%d item(s) lost their results (a lost node or worker); running them again (pass %d of "
                    "at most %d)", len(missing), attempt + 1, 1 + job.limits.lost_item_passes,
                )  # fmt: skip
                ray.get(ledger.new_pass.remote())
            # No prefetch: Ray's iterator would hold each block until the next one arrives, so a stalled
            # or killed run would not have committed everything that had reached the driver.
            batches = build_dataset(job, missing, job_id, model, pack_ledger=ledger).iter_batches(
                batch_format="pyarrow", batch_size=None, prefetch_batches=0
            )
            try:
                for batch in batches:
                    rows = batch.to_pylist()
                    writer.add(rows)
                    if line is not None:
                        line.rows(rows)
            except ExecutionTimeoutError as e:
                running = str(e).partition("Operators still running:")[2].partition("If this is expected")[0]
                stages = f"\nStages still running:{running.rstrip()}" if running.strip() else ""
                raise JobStalled(job.limits.no_progress_timeout_s, stages) from None
            missing = [it for it in missing if it.item_id not in writer.assembler.completed]
            if not missing:
                break
        given_up = ray.get(ledger.items_given_up.remote()) if missing else {}
    except BaseException:
        writer.flush()  # items that arrived whole are kept; the rest is redone by the next run
        if line is not None:
            line.close()
        raise
    finally:
        try:
            ray.kill(ledger)
        except Exception:  # the cluster is gone, and the ledger with it
            pass
    run.repeats = writer.assembler.duplicates
    incomplete = writer.assembler.incomplete()
    for it in missing:
        got = len(incomplete.get(it.item_id, []))
        lost = f"only {got} of its results came back" if got else "no result came back"
        why = "a worker failed on it for good, see the Ray logs"
        if it.item_id in given_up:
            why = (
                f"its batch started on a GPU worker {given_up[it.item_id]} times and the worker died each "
                f"time, limits.infer_retries={job.limits.infer_retries}"
            )
        message = f"{lost} ({why}); the next run redoes it"
        writer.add_item([item_error_row(it, job_id, task.unit_key, message)])
    writer.flush()
    if line is not None:
        line.close()
    return run
