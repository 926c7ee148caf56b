"""Exactly-once Parquet output: whole items per file, each file committed atomically, resume from what is
committed. The output is a local directory or an object-store prefix (s3://, gs://), through one pyarrow
FileSystem (`OutputDir`).

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
way (a PUT over a key swaps it whole). Resume is by listing the prefix. pyarrow cannot send conditional
writes (`If-None-Match`), so the lock is a best-effort one, see `OutputLock`.

On resume, items whose rows are all `ok` are skipped; rows of items to redo are removed from their files
first (each file rewritten atomically), so a row is never present twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage

PART_PREFIX = "part-"
TMP_PREFIX = "_tmp-"  # pyarrow.dataset and pandas ignore names starting with "_" or "."
MANIFEST_NAME = "_manifest.json"
LOCK_NAME = "_vlbatch.lock"
LOCK_SETTLE_S = 1.0  # object-store lock: wait between writing it and reading it back
LOCK_HEARTBEAT_S = 30.0
LOCK_STALE_S = 300.0  # an object-store lock not rewritten for this long belongs to a dead run
UNITS_TOTAL = "units_total"  # set on the last row of an item by the decode stage; never written


@dataclass(frozen=True)
class OutputDir:
    """Where a job's output lives: a local directory or an object-store prefix, as a pyarrow FileSystem and
    a path inside it. Object stores have no directories: a prefix exists once a file is under it."""

    fs: pafs.FileSystem
    path: str  # inside `fs`, no trailing "/"
    prefix: str  # "" for a local directory, "s3://" etc. for an object store

    @classmethod
    def of(cls, where: str | Path | OutputDir) -> OutputDir:
        if isinstance(where, OutputDir):
            return where
        fs, path, prefix = storage.resolve(str(where), "output")
        return cls(fs, path.rstrip("/") or "/", prefix)

    @property
    def local(self) -> bool:
        return not self.prefix

    def uri(self, name: str = "") -> str:
        """The output (or one file of it) as the user writes it: a local path or an s3:// URI."""
        return self.prefix + (f"{self.path}/{name}" if name else self.path)

    def __str__(self) -> str:
        return self.uri()

    def check(self) -> None:
        """Fail now, naming the URI and the fix, if the bucket is missing, access denied or unreachable."""
        storage.check_reachable(self.fs, self.path, self.uri(), "output")

    def names(self, start: str = "") -> list[str]:
        """Names of the files directly in the output that start with `start`, sorted."""
        if self.local:
            out = Path(self.path)
            return sorted(p.name for p in out.glob(f"{start}*") if p.is_file()) if out.is_dir() else []
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError as e:
            raise storage.explain(e, self.uri(), "output") from e
        names = (info.base_name for info in infos if info.type == pafs.FileType.File)
        return sorted(n for n in names if n.startswith(start))

    def read_bytes(self, name: str) -> bytes | None:
        """The whole of one file, None if it is not there."""
        try:
            with self.fs.open_input_stream(f"{self.path}/{name}") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            if self.fs.get_file_info(f"{self.path}/{name}").type == pafs.FileType.NotFound:
                return None
            raise storage.explain(e, self.uri(name), "output") from e

    def write_bytes(self, name: str, data: bytes) -> None:
        """Commit one file whole: a renamed, fsynced temporary file locally, one upload on an object store."""
        if self.local:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            tmp = Path(self.path) / f"{TMP_PREFIX}{name}-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, Path(self.path) / name)
            return
        try:
            # One write of the whole buffer, then close: the object appears at close, all of it.
            stream = self.fs.open_output_stream(f"{self.path}/{name}")
            stream.write(data)
            stream.close()
        except OSError as e:
            raise storage.explain(e, self.uri(name), "output") from e

    def delete(self, name: str) -> None:
        if self.local:
            (Path(self.path) / name).unlink(missing_ok=True)
            return
        try:
            self.fs.delete_file(f"{self.path}/{name}")
        except FileNotFoundError:
            pass
        except OSError as e:
            if self.fs.get_file_info(f"{self.path}/{name}").type != pafs.FileType.NotFound:
                raise storage.explain(e, self.uri(name), "output") from e


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
            raise ValueError(f"{out.uri(name)}: committed output file is unreadable ({e}); move it away, "
                             "rerun") from e
        ids = table.column(item_key).to_pylist()
        state.files[name] = set(ids)
        uris, status_col = table.column(uri_key).to_pylist(), table.column("status").to_pylist()
        for item_id, uri, status in zip(ids, uris, status_col):
            statuses[item_id] = statuses.get(item_id, True) and status == "ok"
            state.item_ids_by_uri.setdefault(uri, set()).add(item_id)
    for item_id, ok in statuses.items():
        (state.ok_items if ok else state.error_items).add(item_id)
    return state


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


class OutputLock:
    """One run at a time per output; a lock left by a killed process on this host is taken over.

    Local: a file created with O_EXCL. Object store: pyarrow cannot make a conditional put, so the lock is an
    object written after checking that none is held, then read back after `LOCK_SETTLE_S`: of two runs that
    raced, only the one whose token is there goes on. The holder rewrites it every `LOCK_HEARTBEAT_S`; a
    lock not rewritten for `LOCK_STALE_S` (its run died on another machine) is taken over, and a run that
    finds its lock taken stops before its next commit. The window left is two runs starting within a few
    milliseconds of each other, each reading no lock; a store with conditional writes would close it.
    """

    def __init__(self, out_dir: str | Path | OutputDir):
        self.out = OutputDir.of(out_dir)
        self.path = Path(self.out.path) / LOCK_NAME if self.out.local else self.out.uri(LOCK_NAME)
        self.token = secrets.token_hex(8)
        self.lost: dict | None = None  # the run that took this lock over, if one did
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> OutputLock:
        if not self.out.local:
            return self._enter_remote()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._is_dead(holder):
                    raise self._busy(holder) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise ValueError(f"{self.path}: could not take the output lock; delete the file and rerun")

    def __exit__(self, *exc) -> None:
        if self.out.local:
            self.path.unlink(missing_ok=True)
            return
        _HELD.pop(self.out.uri(), None)
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        holder = self._holder()
        if holder is not None and holder.get("token") == self.token:
            self.out.delete(LOCK_NAME)

    def check(self) -> None:
        """Raise if another run took this lock over (this one was thought dead); called before each commit."""
        if self.lost is not None:
            raise ValueError(
                f"{self.out}: another vlbatch run ({self.lost}) took over the output lock of this run (its "
                f"heartbeat was older than {LOCK_STALE_S:.0f} s); this run stops, the other one goes on"
            )

    def _me(self) -> bytes:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token}
        return json.dumps({**me, "heartbeat_at": time.time()}).encode()

    def _busy(self, holder: dict) -> ValueError:
        return ValueError(
            f"{self.out}: another vlbatch run ({_describe(holder)}) is writing here; wait for it, or delete "
            f"{self.path} if that run is gone"
        )

    def _enter_remote(self) -> OutputLock:
        self.out.check()
        holder = self._holder()
        if holder is not None and not self._is_dead(holder) and not self._is_stale(holder):
            raise self._busy(holder)
        self.out.write_bytes(LOCK_NAME, self._me())
        time.sleep(LOCK_SETTLE_S)  # a run that raced us has written its own lock by now
        holder = self._holder()
        if holder is None or holder.get("token") != self.token:
            raise self._busy(holder or {"host": "?", "pid": "?"})
        _HELD[self.out.uri()] = self
        self._beat = threading.Thread(target=self._heartbeat, name="vlbatch-lock", daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                holder = self._holder()
                if holder is not None and holder.get("token") != self.token:
                    self.lost = _describe(holder)
                    return
                self.out.write_bytes(LOCK_NAME, self._me())
            except (OSError, ValueError):
                continue  # a store hiccup: the next beat tries again, well within LOCK_STALE_S

    def _holder(self) -> dict | None:
        try:
            data = self.path.read_bytes() if self.out.local else self.out.read_bytes(LOCK_NAME)
        except OSError:
            return None
        try:
            return json.loads(data) if data is not None else None
        except ValueError:
            return None

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        try:
            return time.time() - float(holder["heartbeat_at"]) > LOCK_STALE_S
        except (KeyError, TypeError, ValueError):
            return True  # not a lock this version wrote, or half of one

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


def _describe(holder: dict) -> dict:
    return {k: holder.get(k) for k in ("host", "pid")}


_HELD: dict[str, OutputLock] = {}  # object-store locks this process holds, by output URI


def check_lock(out: OutputDir | None) -> None:
    """Before a commit to an object store: the lock this process took on it must still be its own."""
    lock = _HELD.get(out.uri()) if out is not None and not out.local else None
    if lock is not None:
        lock.check()


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
        self.out.write_bytes(name, parquet_bytes(table))
        self.committed_files.append(name)
        self.committed_rows += table.num_rows
        self.committed_items += len(self.ready_items)
        self.ready, self.ready_items = [], []
        self.last_flush = time.monotonic()
        return self.out.uri(name)


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
