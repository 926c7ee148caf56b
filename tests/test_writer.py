"""Exactly-once output: whole items per file, atomic commit, partial files ignored, resume replaces errors."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.lock import LOCK_NAME, OutputLock
from pipeline.rows import UNITS_TOTAL
from pipeline.storage import TMP_PREFIX
from pipeline.writer import DatasetWriter, drop_items, part_files, remove_partial_files, scan_output

SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("source_uri", pa.string()),
        ("unit_index", pa.int64()),
        ("status", pa.string()),
        ("text", pa.string()),
    ],
    metadata={"vlbatch.schema_version": "test-1"},
)


def item_rows(item: int, units: int, status: str = "ok") -> list[dict]:
    rows = [
        {
            "item_id": f"id{item}",
            "source_uri": f"/data/f{item}.mp4",
            "unit_index": u,
            "status": status,
            "text": f"{item}/{u}",
        }
        for u in range(units)
    ]
    rows[-1][UNITS_TOTAL] = units
    return rows


def shuffled_stream(items: dict[int, int], seed: int = 0, repeat: float = 0.0) -> list[dict]:
    rows = [r for i, n in items.items() for r in item_rows(i, n)]
    rng = random.Random(seed)
    rows += [dict(r) for r in rows if rng.random() < repeat]  # retried tasks deliver some units twice
    rng.shuffle(rows)
    return rows


def read_back(out) -> pd.DataFrame:
    return pd.read_parquet(out)


def test_one_row_per_unit_many_items_per_file(tmp_path):
    items = {i: 1 + i % 4 for i in range(40)}
    writer = DatasetWriter(tmp_path, SCHEMA, rows_per_file=20)
    stream = shuffled_stream(items, repeat=0.3)
    for k in range(0, len(stream), 7):
        writer.add(stream[k : k + 7])
    writer.flush()

    df = read_back(tmp_path)
    assert len(df) == sum(items.values())
    assert not df.duplicated(["item_id", "unit_index"]).any()
    assert writer.assembler.duplicates > 0
    assert writer.assembler.incomplete() == {}
    files = part_files(tmp_path)
    assert 1 < len(files) < len(items)
    # Every item lives wholly in one file.
    per_file = [set(pq.read_table(f).column("item_id").to_pylist()) for f in files]
    assert sum(len(s) for s in per_file) == len(items)
    table = pads.dataset(str(tmp_path), format="parquet").to_table()
    assert table.num_rows == len(df)
    assert table.schema.metadata[b"vlbatch.schema_version"] == b"test-1"


def test_incomplete_item_is_never_committed(tmp_path):
    writer = DatasetWriter(tmp_path, SCHEMA, rows_per_file=1)
    rows = item_rows(1, 3)
    writer.add([rows[0], rows[2]])  # unit 1 still missing
    assert part_files(tmp_path) == []
    assert list(writer.assembler.incomplete()) == ["id1"]
    writer.add([rows[1]])
    assert len(read_back(tmp_path)) == 3


def test_partial_files_of_a_killed_run_are_not_read(tmp_path):
    writer = DatasetWriter(tmp_path, SCHEMA)
    writer.add(item_rows(1, 2))
    writer.flush()
    # What a SIGKILL during a write leaves: a half-written temporary file.
    (tmp_path / f"{TMP_PREFIX}deadbeef-123.parquet").write_bytes(b"PAR1 half a file")
    (tmp_path / "_manifest.json").write_text("{}")
    assert len(read_back(tmp_path)) == 2
    assert pads.dataset(str(tmp_path), format="parquet").count_rows() == 2
    assert remove_partial_files(tmp_path) == 1
    assert len(read_back(tmp_path)) == 2


def test_commit_survives_sigkill_of_writer_process(tmp_path):
    # A child commits some items, then dies by SIGKILL mid-way; what it committed reads back whole.
    code = f"""
import os, signal, sys
sys.path[:0] = [{os.path.dirname(os.path.dirname(__file__))!r}, {os.path.dirname(__file__)!r}]
from test_writer import SCHEMA, item_rows
from pipeline.writer import DatasetWriter
w = DatasetWriter({str(tmp_path)!r}, SCHEMA, rows_per_file=4)
for i in range(10):
    w.add(item_rows(i, 2))
    if i == 6:
        os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    df = read_back(tmp_path)
    state = scan_output(tmp_path)
    assert len(df) == 2 * len(state.items)
    assert 0 < len(state.items) < 10
    assert not df.duplicated(["item_id", "unit_index"]).any()


def test_resume_skips_ok_and_replaces_error_rows(tmp_path):
    writer = DatasetWriter(tmp_path, SCHEMA, rows_per_file=5)
    for i in range(6):
        writer.add(item_rows(i, 2, status="error" if i in (2, 5) else "ok"))
    writer.flush()
    state = scan_output(tmp_path)
    assert state.ok_items == {"id0", "id1", "id3", "id4"}
    assert state.error_items == {"id2", "id5"}
    assert state.item_ids_by_uri["/data/f2.mp4"] == {"id2"}

    assert drop_items(state, state.error_items) == 4
    assert set(read_back(tmp_path).item_id) == {"id0", "id1", "id3", "id4"}
    # The redo commits fresh rows: each unit still appears once.
    writer = DatasetWriter(tmp_path, SCHEMA)
    writer.add(item_rows(2, 2) + item_rows(5, 2))
    writer.flush()
    df = read_back(tmp_path)
    assert len(df) == 12 and (df.status == "ok").all()
    assert not df.duplicated(["item_id", "unit_index"]).any()
    assert scan_output(tmp_path).ok_items == {f"id{i}" for i in range(6)}


def test_dropping_all_items_of_a_file_removes_it(tmp_path):
    writer = DatasetWriter(tmp_path, SCHEMA)
    writer.add(item_rows(1, 1, status="error"))
    writer.flush()
    state = scan_output(tmp_path)
    drop_items(state, {"id1"})
    assert part_files(tmp_path) == [] and state.files == {}


def test_unreadable_committed_file_names_the_file(tmp_path):
    (tmp_path / "part-broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="part-broken.parquet"):
        scan_output(tmp_path)


def test_output_lock(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(ValueError, match="another vlbatch run"):
            OutputLock(tmp_path).__enter__()
    assert not (tmp_path / LOCK_NAME).exists()
    # A lock left by a process that no longer exists is taken over.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    with OutputLock(tmp_path):
        pass
