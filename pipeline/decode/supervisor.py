"""The parent side of isolated decoding: a decode actor's long-lived child process, killed and replaced when
it hangs or crashes, so that a damaged file costs one item, never the worker.

Damaged files can make a decoder spin forever or crash the process, and no Python-level timeout can stop a
thread that is stuck inside C code. So each decode actor keeps one child process (started once, reused for
many items) that runs the real decoder (`child.py`); rows come back over a socket pair (`wire.py`), big
arrays through shared memory (`shared_memory.py`), and are yielded as they arrive.

- A child that makes no progress for `timeout_s` is killed and replaced; the item ends with an error row.
- A child that dies mid-item (signal, os._exit, the OOM killer) is replaced and the item retried, up to
  `max_retries` times, then the item ends with an error row. Rows that already reached the parent are not
  sent again: the retry is told which units it has.

Only the decode factory goes down pickled, once, from the parent. The fault drills that test all this are
in `pipeline/faults.py`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Generator, Iterator
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any

from pipeline.decode.files import DecodeError
from pipeline.decode.shared_memory import SlotMaps
from pipeline.decode.wire import recv_message, send_message
from pipeline.faults import DecodeFaults
from pipeline.rows import error_row

STARTUP_TIMEOUT_S = 120.0  # importing torch, PyAV and PyMuPDF on a loaded node can take a while

log = logging.getLogger(__name__)


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "closed its pipe"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _stop(process: subprocess.Popen, conn: Connection, slots: SlotMaps) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    conn.close()
    slots.close()


class _Child:
    """One running decode child and the parent's end of its socket pair."""

    def __init__(self, factory_pickle: bytes, startup_timeout_s: float):
        parent_conn, child_conn = Pipe(duplex=True)
        fd = child_conn.fileno()
        bootstrap = (
            "import json, sys; sys.path[:0] = json.loads(sys.argv[1]); "
            "from pipeline.decode.child import child_main; child_main(int(sys.argv[2]), int(sys.argv[3]))"
        )
        # Not multiprocessing's spawn: that re-runs the parent's __main__ (a Ray worker script) in the child.
        self.process = subprocess.Popen(
            [sys.executable, "-c", bootstrap, json.dumps(sys.path), str(fd), str(os.getpid())],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
        )
        child_conn.close()  # only the child holds its end now, so its death reads as EOF here
        self.conn = parent_conn
        self.slots = SlotMaps()
        self._finalizer = weakref.finalize(self, _stop, self.process, self.conn, self.slots)
        try:
            self.conn.send_bytes(factory_pickle)
            ready = recv_message(self.conn, startup_timeout_s)
        except (EOFError, OSError):
            ready = {"kind": "fatal", "message": f"the process ended ({self.exit_status()})"}
        if ready is None or ready["kind"] != "ready":
            self.stop()
            why = f"no answer within {startup_timeout_s:g} s" if ready is None else ready["message"]
            raise RuntimeError(f"the decode process failed to start: {why}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self._finalizer()

    def exit_status(self) -> str:
        """How a child that hung up ended (waiting a moment for it to finish dying)."""
        try:
            returncode = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            returncode = None
        self.stop()
        return _describe_exit(returncode)


class IsolatedDecoder:
    """Ray Data flat_map callable: `decode_factory()` (e.g. `DecodeVideo(cfg)`) run in a killable child.

    `timeout_s` bounds the time without progress: how long the parent waits for the item's next row (or
    its end). It is not a budget for the whole item, because a legitimate item's time grows with its size
    (pages, windows), which the job's limits already bound, while a hang is the absence of progress. Time
    the child spends blocked because the consumer is slow is not counted: only the parent's waits are.
    A hang is not retried (it would most likely hang again, costing another timeout); a crash is.
    """

    def __init__(
        self,
        decode_factory: Callable[[], Callable[[dict[str, Any]], Iterator[dict[str, Any]]]],
        timeout_s: float = 600.0,
        max_retries: int = 2,
        faults: DecodeFaults | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, not {max_retries}")
        self.decode_factory = decode_factory
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.faults = DecodeFaults.from_env() if faults is None else faults
        self.startup_timeout_s = startup_timeout_s
        self._factory_pickle = pickle.dumps(decode_factory)  # fails here, not in the child, if it cannot
        self._child: _Child | None = None
        self._busy = threading.Lock()

    @property
    def child_pid(self) -> int | None:
        """Process id of the current child (None before the first item or after a kill)."""
        return self._child.process.pid if self._child is not None and self._child.alive() else None

    def close(self) -> None:
        """Kill the child; a later item starts a new one."""
        if self._child is not None:
            self._child.stop()
            self._child = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_busy")
        state["_child"] = None  # a process cannot travel; the copy starts its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._busy = threading.Lock()

    def __call__(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("IsolatedDecoder decodes one item at a time; give each thread its own")
        finished = False
        try:
            yield from self._decode_item(row)
            finished = True
        finally:
            if not finished:  # abandoned or failed mid-item: the child may still be sending this item's rows
                self.close()
            self._busy.release()

    def _decode_item(self, row: dict[str, Any]) -> Generator[dict[str, Any], None, None]:
        uri = str(row.get("uri"))
        have: list[list[Any]] = []  # unit identities of the rows already yielded
        crashes: list[str] = []
        idle_deaths = 0
        while True:
            try:
                if self._child is None or not self._child.alive():
                    self.close()
                    self._child = _Child(self._factory_pickle, self.startup_timeout_s)
            except RuntimeError as e:
                yield error_row(row, "decode", DecodeError(f"{uri}: {e}"))
                return
            fault = self.faults.for_item(uri, len(crashes))
            outcome, detail = yield from self._attempt(self._child, row, have, fault)
            if outcome == "end":
                return
            if outcome == "dead" and idle_deaths < 1:
                idle_deaths += 1  # it died before it took this item (killed while idle): not the item's fault
                continue
            if outcome in ("crash", "dead"):
                crashes.append(detail)
                if len(crashes) <= self.max_retries:
                    log.warning(
                        "%s: decode process %s; retrying on a new one (%d rows kept)", uri, detail, len(have)
                    )
                    continue
                tries = f"all {len(crashes)} attempts" if len(crashes) > 1 else "its only attempt"
                detail = (
                    f"the decode process crashed on {tries} ({'; '.join(crashes)}); "
                    "the file may be damaged, or the worker short of memory: check the file, or remove it "
                    "from the inputs"
                )
            elif outcome == "timeout":
                detail = (
                    f"decode made no progress for {self.timeout_s:g} s and was killed "
                    "(limits.decode_timeout_s); the file is likely damaged: check it, or raise the limit if "
                    "it is only slow"
                )
            yield error_row(row, "decode", DecodeError(f"{uri}: {detail}"))
            return

    def _attempt(
        self, child: _Child, row: dict[str, Any], have: list[list[Any]], fault: dict[str, Any] | None
    ) -> Generator[dict[str, Any], None, tuple[str, str]]:
        """Yield the rows of one attempt; return how it ended (end, raise, timeout, crash, or dead: gone
        before it took the item) and a detail."""
        try:
            send_message(child.conn, {"kind": "item", "row": row, "skip": have, "fault": fault})
            started = recv_message(child.conn, self.timeout_s)
        except (EOFError, OSError):
            return "dead", child.exit_status()
        if started is None:
            self.close()
            return "timeout", ""
        while True:
            try:
                message = recv_message(child.conn, self.timeout_s, child.slots)
            except (EOFError, OSError):
                return "crash", child.exit_status()
            if message is None:
                self.close()
                return "timeout", ""
            if message["kind"] == "row":
                have.append(message["key"])
                yield message["row"]
                try:  # the consumer is back for more: the child may decode one more row ahead
                    send_message(child.conn, {"kind": "ack"})
                except OSError:
                    return "crash", child.exit_status()
            elif message["kind"] == "end":
                return "end", ""
            else:
                return "raise", message.get("message", "")
