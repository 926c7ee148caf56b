"""Exactly-once Parquet output: whole items per file, atomic commit by rename, resume from what is committed.

Ray Data's `write_parquet` names files per run, so a rerun would append a second copy. Here the driver
writes instead: rows are held until every unit (window / page) of an item has arrived, complete items are
grouped many to a file, and each file is written under a name that dataset readers skip (leading `_`) and
renamed into place. A killed run leaves only `_tmp-*` files, which are removed on the next start and never
read as results. On resume, items whose rows are all `ok` are skipped; rows of items to redo are removed
from their files first (each file rewritten atomically), so a row is never present twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PART_PREFIX = "part-"
TMP_PREFIX = "_tmp-"  # pyarrow.dataset and pandas ignore names starting with "_" or "."
MANIFEST_NAME = "_manifest.json"
LOCK_NAME = "_vlbatch.lock"
UNITS_TOTAL = "units_total"  # set on the last row of an item by the decode stage; never written


def part_files(out_dir: str | Path) -> list[Path]:
    """Committed data files of an output directory, sorted."""
    out = Path(out_dir)
    return sorted(out.glob(f"{PART_PREFIX}*.parquet")) if out.is_dir() else []


@dataclass
class OutputState:
    """What an output directory already holds, per item."""

    files: dict[Path, set[str]] = field(default_factory=dict)
    ok_items: set[str] = field(default_factory=set)
    error_items: set[str] = field(default_factory=set)
    item_ids_by_uri: dict[str, set[str]] = field(default_factory=dict)

    @property
    def items(self) -> set[str]:
        return self.ok_items | self.error_items


def scan_output(out_dir: str | Path, item_key: str = "item_id", uri_key: str = "source_uri") -> OutputState:
    """Read only the id, uri and status columns of the committed files."""
    state = OutputState()
    statuses: dict[str, bool] = {}
    for path in part_files(out_dir):
        try:
            table = pq.read_table(path, columns=[item_key, uri_key, "status"])
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{path}: committed output file is unreadable ({e}); move it away, rerun") from e
        ids = table.column(item_key).to_pylist()
        state.files[path] = set(ids)
        uris, status_col = table.column(uri_key).to_pylist(), table.column("status").to_pylist()
        for item_id, uri, status in zip(ids, uris, status_col):
            statuses[item_id] = statuses.get(item_id, True) and status == "ok"
            state.item_ids_by_uri.setdefault(uri, set()).add(item_id)
    for item_id, ok in statuses.items():
        (state.ok_items if ok else state.error_items).add(item_id)
    return state


def drop_items(state: OutputState, item_ids: set[str], item_key: str = "item_id") -> int:
    """Remove every row of `item_ids` from the committed files; each file is replaced atomically."""
    dropped = 0
    for path, ids in list(state.files.items()):
        if not ids & item_ids:
            continue
        table = pq.read_table(path)
        keep = pc.invert(pc.is_in(table.column(item_key), value_set=pa.array(sorted(item_ids))))
        kept = table.filter(keep)
        dropped += table.num_rows - kept.num_rows
        if kept.num_rows == 0:
            path.unlink()
            del state.files[path]
            continue
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
        pq.write_table(kept, tmp, compression="zstd")
        os.replace(tmp, path)
        state.files[path] = ids - item_ids
    state.ok_items -= item_ids
    state.error_items -= item_ids
    return dropped


def remove_partial_files(out_dir: str | Path) -> int:
    """Delete temporary files a killed run left behind."""
    stale = list(Path(out_dir).glob(f"{TMP_PREFIX}*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


class OutputLock:
    """One run at a time per output directory; a lock left by a killed process on this host is taken over."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_NAME

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._is_dead(holder):
                    raise ValueError(
                        f"{self.path.parent}: another vlbatch run ({holder}) is writing here; wait for it, "
                        f"or delete {self.path} if that run is gone"
                    ) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise ValueError(f"{self.path}: could not take the output lock; delete the file and rerun")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _is_dead(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # cannot see processes of another host: assume alive
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError):
            return False
        return False


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
        out_dir: str | Path,
        schema: pa.Schema,
        item_key: str = "item_id",
        unit_key: str = "unit_index",
        rows_per_file: int = 4096,
        flush_every_s: float = 120.0,
        on_item: Callable[[list[dict]], None] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.item_key = item_key
        self.assembler = ItemAssembler(item_key, unit_key)
        self.rows_per_file = rows_per_file
        self.flush_every_s = flush_every_s
        self.on_item = on_item  # sees each whole item once, as it becomes ready (run statistics)
        self.ready: list[dict] = []
        self.ready_items: list[str] = []
        self.last_flush = time.monotonic()
        self.committed_files: list[Path] = []
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

    def flush(self) -> Path | None:
        """Write the ready items to one file: temporary name first, then an atomic rename."""
        if not self.ready:
            return None
        digest = hashlib.sha1("\n".join(sorted(self.ready_items)).encode()).hexdigest()[:24]
        path = self.out_dir / f"{PART_PREFIX}{digest}.parquet"
        tmp = self.out_dir / f"{TMP_PREFIX}{digest}-{os.getpid()}.parquet"
        table = pa.Table.from_pylist(self.ready, schema=self.schema)
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.committed_files.append(path)
        self.committed_rows += table.num_rows
        self.committed_items += len(self.ready_items)
        self.ready, self.ready_items = [], []
        self.last_flush = time.monotonic()
        return path


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write JSON beside its final name and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
