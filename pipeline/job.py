"""A job as a chain of named Ray Data stages, and the driver loop that writes its results exactly once.

    items -> decode (CPU actors) -> prepare (CPU actors) -> pack by tokens -> infer (GPU actors)
          -> postprocess -> driver: assemble whole items, commit Parquet, manifest

Ray connects only when there is work: a rerun over a finished output touches nothing but the manifest.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import secrets
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import storage
from pipeline.budget import model_context, token_budget
from pipeline.infer import FAULT_INFER_EXIT_ENV, Infer, model_identity
from pipeline.isolation import DecodeFaults, IsolatedDecoder, parse_faults
from pipeline.packing import pack_table
from pipeline.postprocess import Postprocess
from pipeline.prepare import BUSY_S, UNIT_ORDINAL, DecodeUnits, Prepare, error_fields, unit_key
from pipeline.progress import ProgressLine, configure_ray_data_output
from pipeline.sources import Item, expand_inputs
from pipeline.writer import (
    MANIFEST_NAME,
    DatasetWriter,
    OutputDir,
    OutputLock,
    drop_items,
    part_files,
    read_json,
    remove_partial_files,
    scan_output,
    write_json_atomic,
)
from schemas import SCHEMA_VERSION, CaptionRecord, CaptionVideosJob, OcrDocumentsJob, PageRecord, arrow_schema

Job = CaptionVideosJob | OcrDocumentsJob
PACK_WINDOW_ROWS = 64  # rows the packer sees at once: enough to fill packs, few enough to bound memory
# Ray Data keeps a few KiB of bookkeeping per block in the driver; capping the blocks caps that memory
# (beyond the cap, blocks hold several items).
MAX_INPUT_BLOCKS = 20_000
FAULTS_DIR = "_faults"  # fault drill counters, in the output directory (ignored by dataset readers)
MAX_LISTED_ERRORS = 100


def record_of(job: Job) -> type[CaptionRecord] | type[PageRecord]:
    return CaptionRecord if isinstance(job, CaptionVideosJob) else PageRecord


def input_kind(job: Job) -> str:
    return "video" if isinstance(job, CaptionVideosJob) else "document"


def unit_name(job: Job) -> str:
    return "windows" if isinstance(job, CaptionVideosJob) else "pages"


def decode_config(job: Job, processor=None):
    """The job's decode settings, every unit sized to fit the model's context (`vlbatch plan` uses it too)."""
    from model.processor import Processor

    processor = processor or Processor.from_pretrained(job.model)
    budget = token_budget(job, processor)
    ip = processor.image_processor
    if isinstance(job, CaptionVideosJob):
        from pipeline.video import VideoDecodeConfig

        return VideoDecodeConfig.from_job(job, budget, (ip.min_pixels, ip.max_pixels))
    from pipeline.documents import DocumentConfig

    return DocumentConfig.from_job(job, budget, (ip.min_pixels, ip.max_pixels))


def make_decoder(job: Job, isolated: bool = True) -> Callable[[], Callable]:
    """A picklable factory of the job's decode stage (built inside each decode actor).

    Isolated (the default): the decoder runs in one killable child process per decode actor, so a hang or
    a crash costs one item, never the worker. Fault drills (VLBATCH_FAULT_DECODE_*) are read here.
    """
    cfg = decode_config(job)
    if isinstance(job, CaptionVideosJob):
        from pipeline.video import DecodeVideo

        factory = functools.partial(DecodeVideo, cfg)
    else:
        from pipeline.documents import RasteriseDocument

        factory = functools.partial(RasteriseDocument, cfg)
    if not isolated:
        return factory
    limits = job.limits
    return functools.partial(
        IsolatedDecoder, factory, limits.decode_timeout_s, limits.decode_retries, DecodeFaults.from_env()
    )


def new_job_id(job: Job) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return job.job_id or f"{job.kind}-{stamp}-{secrets.token_hex(3)}"


def gpus_per_infer_worker(job: Job) -> float:
    """0 on a CPU-only cluster or for device=cpu; the spec's share where the cluster has GPUs."""
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    if job.device == "cpu":
        return 0.0
    if job.device == "cuda" and cluster_gpus == 0:
        raise ValueError("device: cuda, but the Ray cluster has no GPUs; use device: auto or cpu")
    return job.resources.gpus_per_worker if cluster_gpus > 0 else 0.0


def infer_faults(job: Job) -> dict[str, Any]:
    """The GPU-worker fault drill of VLBATCH_FAULT_INFER_EXIT, read on the driver, for the infer actors.

    Its counts are kept as files under the output's `_faults/` folder, so they hold across actor restarts.
    """
    faults = parse_faults(os.environ.get(FAULT_INFER_EXIT_ENV), FAULT_INFER_EXIT_ENV)
    if not faults:
        return {}
    fault_dir = Path(job.output).resolve() / FAULTS_DIR
    fault_dir.mkdir(parents=True, exist_ok=True)
    return {"faults": faults, "fault_dir": str(fault_dir)}


def build_dataset(job: Job, items: list[Item], job_id: str, model: tuple[str, str]):
    """The chain of stages over `items`; nothing runs until the dataset is iterated."""
    import ray.data
    from ray.data import ActorPoolStrategy

    record, r = record_of(job), job.resources
    num_gpus = gpus_per_infer_worker(job)
    device = job.device if job.device != "auto" else ("cuda" if num_gpus > 0 else "cpu")
    # One item per input block (up to a cap) so the decode pool balances items, not block-sized chunks.
    blocks = max(1, min(len(items), MAX_INPUT_BLOCKS))
    ds = ray.data.from_items([asdict(it) for it in items], override_num_blocks=blocks)
    ds = ds.map_batches(
        DecodeUnits,
        fn_constructor_kwargs={"make_decoder": make_decoder(job), "record": record, "job_id": job_id},
        batch_size=1,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=r.decode_workers),
        num_cpus=r.cpus_per_decode_worker,
        **storage.worker_env(),  # decode workers fetch their items themselves
    )
    ds = ds.map_batches(
        Prepare,
        fn_constructor_kwargs={
            "model_path": job.model,
            "record": record,
            "prompt": job.prompt,
            "system_prompt": job.system_prompt,
        },
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=r.decode_workers),
        num_cpus=min(1.0, r.cpus_per_decode_worker),
    )
    ds = ds.map_batches(
        pack_table,
        fn_kwargs={"max_batch_tokens": r.max_batch_tokens},
        batch_size=PACK_WINDOW_ROWS,
        batch_format="pyarrow",
        num_cpus=0.25,
    )
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for actor restarts yet, and warns on the generic ones.
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated", category=Warning)
        ds = ds.map_batches(
            Infer,
            fn_constructor_kwargs={
                "model_path": job.model,
                "record": record,
                "dtype": job.dtype,
                "device": device,
                "sampling": job.sampling.model_dump(),
                "max_batch_tokens": r.max_batch_tokens,
                "max_model_len": model_context(job.model, job.max_model_len),
                "gpu_share": num_gpus,
                **infer_faults(job),
            },
            batch_size=1,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=r.gpu_workers),
            num_gpus=num_gpus,
            num_cpus=1 if num_gpus == 0 else 0.5,
            # A dead GPU worker is restarted (model loaded again) and its batches redone, a bounded number
            # of times: Ray's default is forever, which a batch that kills every worker turns into a hang.
            # Rows of a first attempt that already reached the driver are dropped there as repeats.
            max_restarts=-1,
            max_task_retries=job.limits.infer_retries,
        )
    postprocess = Postprocess(
        record,
        *model,
        json_fields=getattr(job, "caption_format", "text") == "json",
        keep_text_layer=getattr(job, "keep_text_layer", True),
    )
    return ds.map_batches(postprocess, batch_format="pyarrow", num_cpus=0.25)


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


def dataset_totals(
    out_dir: OutputDir, record: type[CaptionRecord] | type[PageRecord]
) -> tuple[dict, list[dict]]:
    """Counts and token sums over every committed row, and the first error rows."""
    if not part_files(out_dir):
        return {
            "items": 0,
            "units": 0,
            "ok": 0,
            "errors": 0,
            "prompt_tokens": 0,
            "visual_tokens": 0,
            "generated_tokens": 0,
        }, []
    key = unit_key(record)
    columns = [
        "item_id",
        "uri",
        "status",
        key,
        "error_stage",
        "error_message",
        "prompt_tokens",
        "visual_tokens",
        "generated_tokens",
    ]
    table = pads.dataset(out_dir.path, filesystem=out_dir.fs, format="parquet").to_table(columns=columns)
    errors = table.filter(pc.equal(table.column("status"), "error"))

    def total(name: str) -> int:
        return int(pc.sum(table.column(name)).as_py() or 0)

    totals = {
        "items": len(pc.unique(table.column("item_id"))),
        "units": table.num_rows,
        "ok": table.num_rows - errors.num_rows,
        "errors": errors.num_rows,
        "prompt_tokens": total("prompt_tokens"),
        "visual_tokens": total("visual_tokens"),
        "generated_tokens": total("generated_tokens"),
    }
    listed = [
        {
            "uri": r["uri"],
            "item_id": r["item_id"],
            key: r[key],
            "stage": r["error_stage"],
            "message": r["error_message"],
        }
        for r in errors.slice(0, MAX_LISTED_ERRORS).to_pylist()
    ]
    return totals, listed


def item_error_row(item: Item, job_id: str, record, message: str) -> dict[str, Any]:
    """The single row of an item whose results did not all come back (redone by the next run)."""
    return {
        "item_id": item.item_id,
        "uri": item.uri,
        "job_id": job_id,
        unit_key(record): None,
        UNIT_ORDINAL: 0,
        **error_fields(item.uri, "pipeline", message),
    }


class Manifest:
    """`_manifest.json` in the output directory: spec, model, counts, throughput, errors, past runs."""

    def __init__(self, out_dir: OutputDir, job: Job, job_id: str, model_path: str, model: tuple[str, str]):
        self.path = out_dir.uri(MANIFEST_NAME)
        previous: dict = read_json(self.path) or {}
        self.data: dict[str, Any] = {
            "job_id": job_id,
            "kind": job.kind,
            "status": "running",
            "schema_version": SCHEMA_VERSION,
            "record": record_of(job).__name__,
            "spec": job.model_dump(mode="json"),
            "model": {"path": model_path, "id": model[0], "fingerprint": model[1]},
            "started_at": dt.datetime.now(dt.UTC).isoformat(),
            "runs": list(previous.get("runs", []))[-19:],
        }

    def save(self, **fields: Any) -> None:
        self.data.update(fields)
        write_json_atomic(self.path, self.data)


@storage.with_job_storage
def run_job(
    job: Job, progress: bool = True, connect: Callable[[], None] | None = None, verbose: bool = False
) -> JobSummary:
    """Run `job` over every input not already done in its output; returns the summary (also printed).

    `progress`: a progress line; `verbose`: Ray Data's own progress bars and log lines instead."""
    started = time.perf_counter()
    record = record_of(job)
    items = expand_inputs(job.inputs, input_kind(job))  # a missing input fails here, before any work
    model = model_identity(job.model)
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
                execute(job, todo, job_id, model, out_dir, record, progress, verbose, run)
            except BaseException as e:  # what was committed stays valid; the next run finishes the rest
                interrupted = isinstance(e, KeyboardInterrupt)
                status = "interrupted" if interrupted else "failed"
                error = "interrupted (Ctrl-C or SIGINT)" if interrupted else f"{type(e).__name__}: {e}"[:2000]
                totals, errors = dataset_totals(out_dir, record)
                this_run = {**run_record(job, job_id, manifest, items, todo, run, started), "status": status}
                manifest.save(
                    status=status, error=error, runs=[*manifest.data["runs"], this_run], errors=errors,
                    counts=output_counts(job, totals),
                )
                if interrupted:
                    raise JobInterrupted(out_dir, totals["items"], len(items)) from None
                raise
        summary = JobSummary(
            job_id=job_id,
            kind=job.kind,
            output=str(out_dir),
            unit=unit_name(job),
            items=len(items),
            items_skipped=len(items) - len(todo),
            items_processed=len(todo),
            run=run,
            wall_s=time.perf_counter() - started,
        )
        totals, errors = dataset_totals(out_dir, record)
        summary.totals = totals
        summary.finished = {it.item_id for it in items} <= scan_output(out_dir, uri_key="uri").items
        status = "finished" if summary.finished else "incomplete"
        this_run = {**run_record(job, job_id, manifest, items, todo, run, started), "status": status}
        manifest.save(
            status=status,
            finished_at=this_run["finished_at"],
            counts=output_counts(job, totals),
            tokens={k: totals[k] for k in ("prompt_tokens", "visual_tokens", "generated_tokens")},
            run=this_run,
            runs=[*manifest.data["runs"], this_run],
            errors=errors,
            errors_truncated=totals["errors"] > len(errors),
        )
    print(summary.line(), flush=True)
    return summary


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: what is committed stays, and rerunning the same command finishes the job."""

    def __init__(self, output: Path, items_done: int, items: int):
        super().__init__(f"{output}: {items_done} of {items} items committed")
        self.output, self.items_done, self.items = output, items_done, items


def output_counts(job: Job, totals: dict[str, Any]) -> dict[str, int]:
    """The manifest's counts of what the output holds."""
    names = {"items": "items", unit_name(job): "units", "ok": "ok", "errors": "errors"}
    return {name: totals[key] for name, key in names.items()}


def run_record(
    job: Job, job_id: str, manifest: Manifest, items: list, todo: list, run: RunStats, started: float
) -> dict[str, Any]:
    """One entry of the manifest's `runs`: what this run did, finished or not."""
    wall_s = time.perf_counter() - started
    return {
        "job_id": job_id,
        "started_at": manifest.data["started_at"],
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "items": len(items),
        "items_skipped": len(items) - len(todo),
        "items_processed": len(todo),
        unit_name(job): run.units,
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


def execute(
    job: Job,
    todo: list[Item],
    job_id: str,
    model: tuple[str, str],
    out_dir: OutputDir,
    record,
    progress: bool,
    verbose: bool = False,
    run: RunStats | None = None,
) -> RunStats:
    """Stream the dataset into the writer, counting into `run`; items whose rows did not all arrive become
    one error row."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress and verbose
    configure_ray_data_output(verbose)
    ctx.execution_options.preserve_order = False
    # A block that fails for good (a batch whose retries are spent) must not end the job: its items are
    # missing at the end of the stream and become error rows below, which the next run redoes.
    ctx.max_errored_blocks = -1
    run = run if run is not None else RunStats()
    line = ProgressLine(job.kind, len(todo), unit_name(job)) if progress and not verbose else None
    writer = DatasetWriter(
        out_dir,
        arrow_schema(record),
        item_key="item_id",
        unit_key=UNIT_ORDINAL,
        rows_per_file=job.limits.rows_per_file,
        flush_every_s=job.limits.commit_every_s,
        on_item=run.add if line is None else lambda rows: (run.add(rows), line.item(rows)),
    )
    try:
        # No prefetch: Ray's iterator would hold each block until the next one arrives, so a stalled or
        # killed run would not have committed everything that had reached the driver.
        for batch in build_dataset(job, todo, job_id, model).iter_batches(
            batch_format="pyarrow", batch_size=None, prefetch_batches=0
        ):
            rows = batch.to_pylist()
            writer.add(rows)
            if line is not None:
                line.rows(rows)
    except BaseException:
        writer.flush()  # items that arrived whole are kept; the rest is redone by the next run
        if line is not None:
            line.close()
        raise
    run.repeats = writer.assembler.duplicates
    incomplete = writer.assembler.incomplete()
    for it in todo:
        if it.item_id in writer.assembler.completed:
            continue
        got = len(incomplete.get(it.item_id, []))
        lost = f"only {got} of its results came back" if got else "no result came back"
        message = f"{lost} (a worker failed on it for good, see the Ray logs); the next run redoes it"
        writer.add_item([item_error_row(it, job_id, record, message)])
    writer.flush()
    if line is not None:
        line.close()
    return run
