"""Decode in a killable child: hangs end in an error row, crashes are retried, rows arrive once and streamed.

The stand-in decoders live here so the child can import them by name, as it imports the real stages.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.decode.shared_memory import ROWS_AHEAD, SHARED_MIN_BYTES, SharedSlots, SlotMaps
from pipeline.decode.supervisor import IsolatedDecoder
from pipeline.decode.wire import recv_message, send_message
from pipeline.faults import FAULT_EXIT_ENV, DecodeFaults, Fault, parse_faults

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class FakePages:
    """A decoder stand-in: `pages` rows per item, page i holding `nbytes` bytes of value i.

    `log_dir` records each page as it is decoded (so a test can see how far the child got); `segfault_on`
    and `raise_on` crash for real or raise on items whose URI contains them.
    """

    pages: int = 3
    nbytes: int = 16
    log_dir: str | None = None
    segfault_on: str | None = None
    raise_on: str | None = None

    def __call__(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        uri = row["uri"]
        if self.segfault_on and self.segfault_on in uri:
            ctypes.string_at(0)  # a real SIGSEGV, as a decoder bug in C gives
        if self.raise_on and self.raise_on in uri:
            raise RuntimeError("the decoder gave up")
        for i in range(self.pages):
            if self.log_dir:
                with open(os.path.join(self.log_dir, "decoded.log"), "a") as log:
                    log.write(f"{i}\n")
            yield {**row, "status": "ok", "page_index": i, "image": np.full(self.nbytes, i % 256, np.uint8)}


@dataclass
class NaiveLastPage:
    """What a decoder without the zero-page guard does: ask PyMuPDF for the last page of the document."""

    def __call__(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        import pymupdf

        with pymupdf.open(row["uri"]) as doc:
            page = doc[-1]  # a truncated PDF opens with 0 pages; this never returns (PyMuPDF 1.28.2)
            yield {**row, "status": "ok", "page_index": page.number}


def decoder(timeout_s: float = 30.0, max_retries: int = 2, faults: DecodeFaults | None = None, **fake):
    return IsolatedDecoder(
        functools.partial(FakePages, **fake), timeout_s, max_retries, faults or DecodeFaults()
    )


def item(name: str) -> dict[str, Any]:
    return {"uri": f"/data/{name}", "item_id": name}


def pages_of(rows: list[dict[str, Any]]) -> list[int]:
    return [r["page_index"] for r in rows if r["status"] == "ok"]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_fault_specs_parse_counts_from_the_end():
    assert parse_faults(None) == ()
    assert parse_faults("a.mp4") == (Fault("a.mp4", 1, 0),)
    assert parse_faults("s3://bucket/x.pdf:2:1, b.avi:3") == (
        Fault("s3://bucket/x.pdf", 2, 1),
        Fault("b.avi", 3),
    )
    faults = DecodeFaults.from_env({FAULT_EXIT_ENV: "x.pdf:2"})
    attempts = [faults.for_item("/d/x.pdf", k) for k in range(3)]
    assert attempts == [{"kind": "exit", "after_rows": 0}, {"kind": "exit", "after_rows": 0}, None]
    assert faults.for_item("/d/y.pdf", 0) is None
    with pytest.raises(ValueError, match=FAULT_EXIT_ENV):
        parse_faults(":3", FAULT_EXIT_ENV)


def test_messages_carry_arrays_bytes_and_json_values_without_pickle():
    from multiprocessing import Pipe

    a, b = Pipe()
    frames = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    row = {
        "frames": frames[:, ::-1],  # not contiguous
        "empty": np.zeros((0, 5), np.float32),
        "raw": b"\x00\x01",
        "stamps": (0.5, float("nan")),
        "count": np.int64(7),
        "nested": {"none": None, "flags": [True, False], "text": "é"},
    }
    send_message(a, row)
    got = recv_message(b, timeout_s=5)
    np.testing.assert_array_equal(got["frames"], frames[:, ::-1])
    assert got["frames"].flags.writeable and got["empty"].shape == (0, 5) and got["empty"].dtype == np.float32
    assert got["raw"] == b"\x00\x01" and got["count"] == 7 and type(got["count"]) is int
    assert got["stamps"][0] == 0.5 and math.isnan(got["stamps"][1])
    assert got["nested"] == row["nested"]
    assert recv_message(b, timeout_s=0.01) is None  # nothing more: a timeout, not an error
    with pytest.raises(TypeError, match="cannot cross"):
        send_message(a, {"when": object()})


def test_big_arrays_go_through_reused_shared_slots_and_come_out_as_copies():
    from multiprocessing import Pipe

    a, b = Pipe()
    sender, receiver = SharedSlots(count=2), SlotMaps()
    big = np.arange(SHARED_MIN_BYTES, dtype=np.uint8).reshape(-1, 8)
    try:
        sent = []
        for k in range(5):  # more messages than slots: each slot is written again after it was read
            row = {
                "frames": (big + k)[:, ::-1],  # not contiguous
                "mask": np.full((3, SHARED_MIN_BYTES // 3 + 1), k, np.int16),  # a second big one, same slot
                "small": np.arange(5, dtype=np.float32),  # below the threshold: inline, as ever
                "index": k,
            }
            send_message(a, row, sender)
            got = recv_message(b, 5, receiver)
            sent.append(row)
            for key in ("frames", "mask", "small"):
                np.testing.assert_array_equal(got[key], row[key])
                assert got[key].dtype == row[key].dtype and got[key].flags.writeable
            assert got["index"] == k
        assert sorted(receiver.maps) == [0, 1]
        first_maps = dict(receiver.maps)
        send_message(a, {"frames": big}, sender)  # fits the slot it lands in: no new memory
        np.testing.assert_array_equal(recv_message(b, 5, receiver)["frames"], big)
        assert receiver.maps[1] is first_maps[1]
        huge = np.ones(4 << 20, np.uint8)  # does not fit: that slot is replaced by a bigger one
        send_message(a, {"frames": huge}, sender)
        np.testing.assert_array_equal(recv_message(b, 5, receiver)["frames"], huge)
        assert receiver.maps[0] is not first_maps[0] and len(receiver.maps[0]) >= huge.nbytes
        with pytest.raises(EOFError, match="takes none"):  # a receiver that expects no shared arrays
            send_message(a, {"frames": big}, sender)
            recv_message(b, 5)
    finally:
        sender.close()
        receiver.close()


def test_an_array_made_in_the_next_slot_is_sent_without_a_copy():
    from multiprocessing import Pipe

    placed = SharedSlots(count=2)
    for k in range(4):
        page = placed.allocate((512, 256, 3), np.uint8)  # what a decoder renders into
        page[...] = k
        index, offsets, _ = placed.place([page])
        assert offsets == [0] and index == k % 2
        assert placed.slots[index][1][: page.nbytes] == page.tobytes()  # it was there already
    placed.close()
    a, b = Pipe()
    sender, receiver = SharedSlots(count=2), SlotMaps()
    try:
        # Made in the slot, then sent with another big array that makes the slot grow: both still arrive.
        page = sender.allocate((512, 256, 3), np.uint8)
        page[...] = 7
        extra = np.full(2 << 20, 9, np.uint8)
        send_message(a, {"image": page, "extra": extra}, sender)
        got = recv_message(b, 5, receiver)
        assert (got["image"] == 7).all() and got["image"].shape == (512, 256, 3) and (got["extra"] == 9).all()
        # An allocation the decoder dropped (a page that failed) is simply written over by the next row.
        sender.allocate((512, 256, 3), np.uint8)[...] = 1
        other = np.full((512, 256, 3), 5, np.uint8)
        send_message(a, {"image": other}, sender)
        assert (recv_message(b, 5, receiver)["image"] == 5).all()
        assert sender.allocate((2, 2), np.uint8).base is None  # small: an ordinary array, sent inline
    finally:
        sender.close()
        receiver.close()


def test_messages_over_the_shared_cap_go_through_the_socket(monkeypatch):
    """Slots never shrink: a huge row must not leave huge slots mapped. Above SHARED_MAX_BYTES a message's
    arrays go inline, except one made in the slot (already written there, so it must go shared)."""
    from multiprocessing import Pipe

    import pipeline.decode.shared_memory as isolation

    kib = 1 << 10  # small sizes: inline bytes must fit the socket buffer, as nothing reads meanwhile
    monkeypatch.setattr(isolation, "SHARED_MIN_BYTES", kib)
    monkeypatch.setattr(isolation, "SHARED_MAX_BYTES", 3 * kib)
    a, b = Pipe()
    sender, receiver = SharedSlots(), SlotMaps()
    try:
        assert sender.allocate((4 * kib,), np.uint8).base is None  # over the cap: not in a slot
        big = np.full(4 * kib, 3, np.uint8)
        send_message(a, {"image": big}, sender)
        assert (recv_message(b, 5, receiver)["image"] == 3).all() and not receiver.maps  # through the socket
        page = sender.allocate((2 * kib,), np.uint8)
        page[...] = 4
        extra = np.full(2 * kib, 5, np.uint8)  # with the page it would pass the cap: inline
        send_message(a, {"image": page, "extra": extra}, sender)
        got = recv_message(b, 5, receiver)
        assert (got["image"] == 4).all() and (got["extra"] == 5).all()
        assert list(receiver.maps) == [0]  # only the page's slot
    finally:
        sender.close()
        receiver.close()


def test_rows_come_back_as_the_decoder_made_them_and_the_child_is_reused():
    dec = decoder(pages=3, nbytes=5)
    try:
        first = list(dec(item("a.pdf")))
        pid = dec.child_pid
        second = list(dec(item("b.pdf")))
        assert dec.child_pid == pid  # one child for many items, not one per item
        direct = list(FakePages(pages=3, nbytes=5)(item("a.pdf")))
        assert [r.keys() for r in first] == [r.keys() for r in direct]
        for got, want in zip(first, direct, strict=True):
            np.testing.assert_array_equal(got.pop("image"), want.pop("image"))
            assert got == want
        assert pages_of(second) == [0, 1, 2] and {r["item_id"] for r in second} == {"b.pdf"}
    finally:
        dec.close()
    assert gone(pid)


def test_a_hang_in_c_becomes_an_error_row_and_the_next_item_decodes_on_a_new_child():
    faults = DecodeFaults(hang=(Fault("stuck.pdf", times=1, after_rows=2),))
    dec = decoder(timeout_s=1.5, faults=faults, pages=4)
    try:
        assert pages_of(list(dec(item("a.pdf")))) == [0, 1, 2, 3]
        hung_pid = dec.child_pid
        rows = list(dec(item("stuck.pdf")))
        assert [r["status"] for r in rows] == ["ok", "ok", "error"]  # the rows before the hang stand
        assert pages_of(rows) == [0, 1]
        error = rows[-1]
        assert error["error_stage"] == "decode" and error["item_id"] == "stuck.pdf"
        assert error["error_message"].startswith("/data/stuck.pdf: decode made no progress for 1.5 s")
        assert "limits.decode_timeout_s" in error["error_message"]
        assert gone(hung_pid)  # killed and reaped, not left spinning
        assert pages_of(list(dec(item("b.pdf")))) == [0, 1, 2, 3]
        assert dec.child_pid not in (None, hung_pid)
    finally:
        dec.close()


def test_the_real_pymupdf_hang_on_a_truncated_pdf_is_ended(tmp_path):
    from media import make_pdf, truncate

    from pipeline.decode.documents import DocumentConfig, RasteriseDocument

    truncated = truncate(
        make_pdf(tmp_path / "full.pdf", pages=4, object_streams=True), 0.5, tmp_path / "t.pdf"
    )
    good = make_pdf(tmp_path / "good.pdf", pages=2)
    dec = IsolatedDecoder(NaiveLastPage, timeout_s=2.0, max_retries=2, faults=DecodeFaults())
    try:
        (row,) = dec({"uri": str(truncated), "item_id": "t"})
        assert row["status"] == "error" and f"{truncated}: decode made no progress" in row["error_message"]
        (row,) = dec({"uri": str(good), "item_id": "g"})
        assert row["status"] == "ok" and row["page_index"] == 1
    finally:
        dec.close()
    # The shipped stage guards this case before it can hang: the same file is a plain error row.
    (row,) = RasteriseDocument(DocumentConfig())({"uri": str(truncated), "item_id": "t"})
    assert row["status"] == "error" and "has no pages" in row["error_message"]


def test_a_crash_mid_item_is_retried_and_every_row_arrives_exactly_once():
    # Attempt 0 sends page 0 and exits, attempt 1 sends page 1 and exits, attempt 2 finishes.
    faults = DecodeFaults(exit=(Fault("flaky.pdf", times=2, after_rows=1),))
    dec = decoder(max_retries=2, faults=faults, pages=5)
    try:
        rows = list(dec(item("flaky.pdf")))
        assert pages_of(rows) == [0, 1, 2, 3, 4]
        assert all(r["status"] == "ok" for r in rows)
        for r in rows:
            assert (r["image"] == r["page_index"]).all()
        assert pages_of(list(dec(item("next.pdf")))) == [0, 1, 2, 3, 4]
    finally:
        dec.close()


def test_a_crash_every_time_ends_in_an_error_row_after_the_retries():
    faults = DecodeFaults(exit=(Fault("doomed.mp4", times=99),))
    dec = decoder(max_retries=2, faults=faults, segfault_on="segv.mp4")
    try:
        (row,) = dec(item("doomed.mp4"))
        assert row["status"] == "error" and row["error_stage"] == "decode" and row["item_id"] == "doomed.mp4"
        assert row["error_message"].startswith(
            "/data/doomed.mp4: the decode process crashed on all 3 attempts "
            "(exit code 13; exit code 13; exit code 13)"
        )
        (row,) = dec(item("segv.mp4"))
        segv = "crashed on all 3 attempts (killed by SIGSEGV; killed by SIGSEGV; killed by SIGSEGV)"
        assert row["status"] == "error" and segv in row["error_message"]
        assert pages_of(list(dec(item("fine.mp4")))) == [0, 1, 2]
    finally:
        dec.close()


def test_no_retries_means_one_attempt():
    dec = decoder(max_retries=0, faults=DecodeFaults(exit=(Fault("x.pdf"),)))
    try:
        (row,) = dec(item("x.pdf"))
        assert (
            "/data/x.pdf: the decode process crashed on its only attempt (exit code 13)"
            in row["error_message"]
        )
    finally:
        dec.close()


def test_a_decoder_that_raises_gives_an_error_row_without_retry():
    dec = decoder(raise_on="bad.pdf")
    try:
        (row,) = dec(item("bad.pdf"))
        assert row["status"] == "error"
        assert row["error_message"] == "/data/bad.pdf: RuntimeError: the decoder gave up"
    finally:
        dec.close()


def test_a_big_document_streams_page_by_page(tmp_path):
    pages, nbytes = 40, 1 << 20  # each row far larger than the socket buffer
    dec = decoder(pages=pages, nbytes=nbytes, log_dir=str(tmp_path))
    try:
        rows = dec(item("big.pdf"))
        first = next(rows)
        assert first["page_index"] == 0
        time.sleep(0.5)  # let the child run as far ahead as it can
        decoded = (tmp_path / "decoded.log").read_text().split()
        # The child runs at most ROWS_AHEAD rows ahead of what the consumer took: the first row is here
        # before the last page was decoded, and only a row or two wait in between.
        assert 1 <= len(decoded) <= 1 + ROWS_AHEAD
        rest = list(rows)
        assert pages_of([first, *rest]) == list(range(pages))
        assert all(r["image"].nbytes == nbytes and (r["image"] == r["page_index"] % 256).all() for r in rest)
        del first, rest
        # A consumer that lets go of each row keeps the parent at a row or two, not the whole document.
        tracemalloc.start()
        try:
            seen = [r["page_index"] for r in dec(item("big2.pdf"))]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert seen == list(range(pages)) and peak < 4 * nbytes
    finally:
        dec.close()


def test_a_real_document_survives_a_crash_halfway_with_each_page_once(tmp_path, monkeypatch):
    from media import make_pdf

    from pipeline.decode.documents import DocumentConfig, RasteriseDocument

    pdf = make_pdf(tmp_path / "long.pdf", pages=120, text=True)
    monkeypatch.setenv(FAULT_EXIT_ENV, "long.pdf:1:60")  # crash once, after 60 pages arrived
    dec = IsolatedDecoder(
        functools.partial(RasteriseDocument, DocumentConfig(target_longest_side=56)), 30.0, 1
    )
    try:
        rows = list(dec({"uri": str(pdf), "item_id": "long"}))
    finally:
        dec.close()
    assert [r["page_index"] for r in rows] == list(range(120))
    assert all(r["status"] == "ok" and r["text_layer"].startswith(f"page {r['page_index']}\n") for r in rows)


def test_an_abandoned_item_leaves_no_stale_rows_for_the_next():
    dec = decoder(pages=6, nbytes=1 << 20)
    try:
        rows = dec(item("a.pdf"))
        next(rows)
        rows.close()  # the consumer stops mid-item: the child is still sending a.pdf
        nxt = list(dec(item("b.pdf")))
        assert {r["item_id"] for r in nxt} == {"b.pdf"} and pages_of(nxt) == list(range(6))
    finally:
        dec.close()


def test_a_child_killed_between_items_is_replaced_without_blame():
    dec = decoder(max_retries=0)
    try:
        list(dec(item("a.pdf")))
        os.kill(dec.child_pid, signal.SIGKILL)
        rows = list(dec(item("b.pdf")))
        assert pages_of(rows) == [0, 1, 2] and all(r["status"] == "ok" for r in rows)
    finally:
        dec.close()


def test_the_decoder_pickles_without_its_child():
    dec = decoder()
    try:
        list(dec(item("a.pdf")))
        copy = pickle.loads(pickle.dumps(dec))
        assert copy.child_pid is None and dec.child_pid is not None
        assert pages_of(list(copy(item("b.pdf")))) == [0, 1, 2]
        copy.close()
    finally:
        dec.close()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        IsolatedDecoder(lambda: FakePages(), 1.0, 0)  # a factory the child could never receive


def test_a_hung_child_dies_with_its_parent(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, functools
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        from pipeline.decode.supervisor import IsolatedDecoder
        from pipeline.faults import DecodeFaults, Fault
        from test_isolation import FakePages
        dec = IsolatedDecoder(FakePages, 600.0, 0, DecodeFaults(hang=(Fault("x", after_rows=1),)))
        rows = dec({{"uri": "x", "item_id": "x"}})
        next(rows)
        print(dec.child_pid, flush=True)
        rows.__next__()  # waits on the hung child until the test kills this process
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    assert not gone(child_pid)
    parent.kill()
    parent.wait()
    for _ in range(100):  # the kernel delivers the parent-death signal at once; allow a loaded machine
        if gone(child_pid) or _zombie(child_pid):
            break
        time.sleep(0.1)
    assert gone(child_pid) or _zombie(child_pid)


def _zombie(pid: int) -> bool:
    """Killed but not yet reaped by whoever adopted it (an init that reaps lazily)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_it_runs_as_a_ray_data_flat_map_actor(ray_local, tmp_path):
    import ray.data
    from media import make_pdf
    from ray.data import ActorPoolStrategy

    from pipeline.decode.documents import DocumentConfig, RasteriseDocument

    names = ["a.pdf", "flaky.pdf", "stuck.pdf", "b.pdf"]
    for name in names:
        make_pdf(tmp_path / name, pages=2)
    items = [{"uri": str(tmp_path / n), "item_id": n} for n in names]
    faults = DecodeFaults(exit=(Fault("flaky", after_rows=1),), hang=(Fault("stuck"),))
    factory = functools.partial(RasteriseDocument, DocumentConfig(target_longest_side=56))
    ds = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
        IsolatedDecoder,
        fn_constructor_args=(factory, 3.0, 2, faults),
        compute=ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )
    rows = ds.take_all()
    by_item = {
        n: sorted((r["status"], r.get("page_index")) for r in rows if r["item_id"] == n) for n in names
    }
    ok = [("ok", 0), ("ok", 1)]
    assert by_item == {"a.pdf": ok, "flaky.pdf": ok, "stuck.pdf": [("error", None)], "b.pdf": ok}
