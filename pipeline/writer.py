"""Exactly-once Parquet output: whole items per file, each file committed atomically, resume from what is
committed. The output is a local directory or an object-store prefix (s3://, gs://), through one pyarrow
FileSystem (`storage.OutputDir`); one run at a time (`lock.OutputLock`).

Ray Data's `write_parquet` names files per run, so a rerun would append a second copy. Here the driver
writes instead: rows are held until every unit (window / page) of an item has arrived, complete items are
grouped many to a file, named by a hash of their item ids (a retry of the same items reproduces the name).

Commit, local directory: each file is written under a name that dataset readers skip (leading `_`),
fsynced and renamed into place. A killed run leaves only `_tmp-*` files, which are removed on the next
start and never read as results.

Commit, object store (no rename there): each file is built whole in memory and uploaded under its final
name in one upload; S3 and GCS make an object visible only when its upload completes (a single PUT or a
completed multipart upload), so a killed upload leaves no object at all, never half of one (an unfinished
multipart upload is invisible; a bucket lifecycle rule reclaims its parts). A file is replaced the same
way (a PUT over a key swaps it whole). Resume is by listing the prefix. On s3:// a new file is uploaded with
`If-None-Match: *`, so it never replaces an object of the same name, and the lock is a conditional put too
(see `OutputLock`); stores without conditional writes (gs://) get plain uploads and a best-effort lock.

On resume, items whose rows are all `ok` are skipped; rows of items to redo are removed from their files
first (each file rewritten atomically), so a row is never present twice.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.lock import check_lock
from pipeline.rows import UNITS_TOTAL
from pipeline.storage import TMP_PREFIX, ConditionalWritesUnsupported, OutputDir, PreconditionFailed

PART_PREFIX = "part-"
MANIFEST_NAME = "_manifest.json"


def part_files(out_dir: str | Path | OutputDir) -> list:
    """Committed data files of an output, sorted: Paths for a local directory, URIs for an object store."""
    out = OutputDir.of(out_dir)
    names = [n for n in out.names(PART_PREFIX) if n.endswith(".parquet")]
    return [Path(out.path) / n for n in names] if out.local else [out.uri(n) for n in names]


def parquet_bytes(table: pa.Table) -> bytes:
    """A whole Parquet file in memory, to be committed in one write."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


@dataclass
class OutputState:
    """What an output directory already holds, per item."""

    out: OutputDir | None = None
    files: dict[str, set[str]] = field(default_factory=dict)  # file name -> item ids in it
    ok_items: set[str] = field(default_factory=set)
    error_items: set[str] = field(default_factory=set)
    item_ids_by_uri: dict[str, set[str]] = field(default_factory=dict)
    schema: pa.Schema | None = None  # of one committed file, if any

    @property
    def items(self) -> set[str]:
        return self.ok_items | self.error_items


def scan_output(
    out_dir: str | Path | OutputDir, item_key: str = "item_id", uri_key: str = "source_uri"
) -> OutputState:
    """Read only the id, uri and status columns of the committed files."""
    out = OutputDir.of(out_dir)
    state = OutputState(out)
    statuses: dict[str, bool] = {}
    for name in (n for n in out.names(PART_PREFIX) if n.endswith(".parquet")):
        try:
            columns = [item_key, uri_key, "status"]
            table = pq.read_table(f"{out.path}/{name}", columns=columns, filesystem=out.fs)
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(
                f"{out.uri(name)}: committed output file is unreadable ({e}); move it away, rerun"
            ) from e
        if state.schema is None:
            state.schema = pq.read_schema(f"{out.path}/{name}", filesystem=out.fs)
        ids = table.column(item_key).to_pylist()
        state.files[name] = set(ids)
        uris, status_col = table.column(uri_key).to_pylist(), table.column("status").to_pylist()
        for item_id, uri, status in zip(ids, uris, status_col):
            statuses[item_id] = statuses.get(item_id, True) and status == "ok"
            state.item_ids_by_uri.setdefault(uri, set()).add(item_id)
    for item_id, ok in statuses.items():
        (state.ok_items if ok else state.error_items).add(item_id)
    return state


def check_same_fields(state: OutputState, schema: pa.Schema) -> None:
    """Refuse to add rows whose `fields` struct differs from the committed rows' (a changed caption_schema or
    page_schema): one dataset must read back with one type."""
    if state.schema is None:
        return
    old, new = (s.field("fields").type if "fields" in s.names else None for s in (state.schema, schema))
    if old != new:
        raise ValueError(
            f"{state.out}: its rows have `fields` of type {old} but this job writes {new} (caption_schema or "
            "page_schema changed); write to a new output, or move the old one away"
        )


def drop_items(state: OutputState, item_ids: set[str], item_key: str = "item_id") -> int:
    """Remove every row of `item_ids` from the committed files; each file is replaced atomically."""
    dropped, out = 0, state.out
    for name, ids in list(state.files.items()):
        if not ids & item_ids:
            continue
        check_lock(out)
        table = pq.read_table(f"{out.path}/{name}", filesystem=out.fs)
        keep = pc.invert(pc.is_in(table.column(item_key), value_set=pa.array(sorted(item_ids))))
        kept = table.filter(keep)
        dropped += table.num_rows - kept.num_rows
        if kept.num_rows == 0:
            out.delete(name)
            del state.files[name]
            continue
        out.write_bytes(name, parquet_bytes(kept))
        state.files[name] = ids - item_ids
    state.ok_items -= item_ids
    state.error_items -= item_ids
    return dropped


def remove_partial_files(out_dir: str | Path | OutputDir) -> int:
    """Delete temporary files a killed run left behind (an object store never has any)."""
    out = OutputDir.of(out_dir)
    stale = out.names(TMP_PREFIX)
    for name in stale:
        out.delete(name)
    return len(stale)


@dataclass
class ItemAssembler:
    """Collects unit rows until every unit of an item is present; drops repeated units (task retries)."""

    item_key: str = "item_id"
    unit_key: str = "unit_index"
    pending: dict[str, dict[int, dict]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    completed: set[str] = field(default_factory=set)  # a unit redelivered after its item went out is a repeat
    duplicates: int = 0

    def add(self, row: dict) -> list[dict] | None:
        """Take one row; returns the item's rows (by unit) when this row completed it."""
        item_id, unit = row[self.item_key], int(row[self.unit_key])
        units = self.pending.setdefault(item_id, {}) if item_id not in self.completed else None
        if units is None or unit in units:
            self.duplicates += 1
            return None
        units[unit] = row
        if row.get(UNITS_TOTAL):
            self.totals[item_id] = int(row[UNITS_TOTAL])
        total = self.totals.get(item_id)
        if total is None or len(units) < total:
            return None
        del self.pending[item_id], self.totals[item_id]
        self.completed.add(item_id)
        return [units[k] for k in sorted(units)]

    def incomplete(self) -> dict[str, list[dict]]:
        """Items some of whose units never arrived, with the rows that did."""
        return {item_id: [units[k] for k in sorted(units)] for item_id, units in self.pending.items()}


class DatasetWriter:
    """Buffers complete items and commits them, many items per file, under content-derived names."""

    def __init__(
        self,
        out_dir: str | Path | OutputDir,
        schema: pa.Schema,
        item_key: str = "item_id",
        unit_key: str = "unit_index",
        rows_per_file: int = 4096,
        flush_every_s: float = 120.0,
        on_item: Callable[[list[dict]], None] | None = None,
    ):
        self.out = OutputDir.of(out_dir)
        if self.out.local:
            Path(self.out.path).mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.item_key = item_key
        self.assembler = ItemAssembler(item_key, unit_key)
        self.rows_per_file = rows_per_file
        self.flush_every_s = flush_every_s
        self.on_item = on_item  # sees each whole item once, as it becomes ready (run statistics)
        self.ready: list[dict] = []
        self.ready_items: list[str] = []
        self.last_flush = time.monotonic()
        self.committed_files: list[str] = []  # names of the files this writer committed
        self.committed_rows = 0
        self.committed_items = 0

    def add(self, rows: Iterable[dict]) -> None:
        """Take result rows in any order; complete items are committed when a file's worth is ready."""
        for row in rows:
            done = self.assembler.add(row)
            if done is not None:
                self.add_item(done)
                if len(self.ready) >= self.rows_per_file:  # checked per item: a batch may hold many files
                    self.flush()
        if self.ready and time.monotonic() - self.last_flush >= self.flush_every_s:
            self.flush()

    def add_item(self, rows: list[dict]) -> None:
        """Commit-ready rows of one whole item (e.g. the error row of an item that never reached the end)."""
        self.ready.extend(rows)
        self.ready_items.append(rows[0][self.item_key])
        if self.on_item is not None:
            self.on_item(rows)

    def flush(self) -> str | None:
        """Commit the ready items as one file (see the module's docstring); returns its URI."""
        if not self.ready:
            return None
        check_lock(self.out)
        digest = hashlib.sha1("\n".join(sorted(self.ready_items)).encode()).hexdigest()[:24]
        name = f"{PART_PREFIX}{digest}.parquet"
        table = pa.Table.from_pylist(self.ready, schema=self.schema)
        commit_new_file(self.out, name, parquet_bytes(table))
        self.committed_files.append(name)
        self.committed_rows += table.num_rows
        self.committed_items += len(self.ready_items)
        self.ready, self.ready_items = [], []
        self.last_flush = time.monotonic()
        return self.out.uri(name)


def commit_new_file(out: OutputDir, name: str, data: bytes) -> None:
    """Upload a new part file; where the store takes conditional writes, only if no object has its name
    (`If-None-Match: *`), so a run that lost its lock can never replace another run's file."""
    if not out.conditional:
        out.write_bytes(name, data)
        return
    try:
        out.write_bytes(name, data, if_absent=True)
    except ConditionalWritesUnsupported:
        out.write_bytes(name, data)
    except PreconditionFailed:
        there = out.read_bytes(name)
        if there != data:  # the same bytes: our own upload, retried after its reply was lost
            raise ValueError(
                f"{out.uri(name)}: another run committed this file while this one was writing; this run "
                "stops. Check that only one job writes to this output, then rerun to finish it"
            ) from None


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON whole under its final name (renamed into place locally): readers never see half a file."""
    folder, name = str(path).rsplit("/", 1)
    out = OutputDir.of(folder)
    check_lock(out)
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    out.write_bytes(name, text.encode())


def read_json(path: str | Path) -> dict | None:
    """A JSON file of the output (the manifest), None if absent or unreadable."""
    folder, name = str(path).rsplit("/", 1)
    try:
        data = OutputDir.of(folder).read_bytes(name)
        return json.loads(data) if data is not None else None
    except (OSError, ValueError):
        return None
