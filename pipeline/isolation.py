"""Decode in a child process that can be killed: a hang or a crash costs one item, never the worker.

Damaged files can make a decoder spin forever or crash the process, and no Python-level timeout can stop a
thread that is stuck inside C code. So each decode actor keeps one long-lived child process (started once,
reused for many items) that runs the real decoder. Items go down one at a time; rows come back one by one
over a socket pair and are yielded as they arrive, so a 300-page document is never held whole. The parent
acknowledges a row when its consumer asks for the next one, and the child runs at most ROWS_AHEAD rows
ahead of the acknowledgements: it decodes the next row while the parent hands on this one, and a slow
consumer holds it back.

- A child that makes no progress for `timeout_s` is killed and replaced; the item ends with an error row.
- A child that dies mid-item (signal, os._exit, the OOM killer) is replaced and the item retried, up to
  `max_retries` times, then the item ends with an error row. Rows that already reached the parent are not
  sent again: the retry is told which units it has, and the child drops those (dedup by unit index).

Rows travel as a JSON header plus raw array bytes, never pickled: a child that a hostile file has taken over
cannot make the parent run code. Only the decode factory goes down pickled, once, from the parent. Big
arrays (a page image, a window of frames) go through a few shared-memory slots the child reuses: one copy
in, one copy out, and only their place crosses the socket.

Fault injection, for tests and failure drills (both read from the environment of the process that builds
the decoder; SUBSTRING is matched against the item's URI, several entries are separated by commas):

    VLBATCH_FAULT_DECODE_EXIT="SUBSTRING[:TIMES[:AFTER_ROWS]]"  the child os._exit(13)s on matching items
    VLBATCH_FAULT_DECODE_HANG="SUBSTRING[:TIMES[:AFTER_ROWS]]"  the child sleeps forever in C, holding the GIL

on the first TIMES attempts (default 1) of each matching item, after sending AFTER_ROWS rows (default 0).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import weakref
from array import array as int_array
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from pipeline.media import DecodeError, error_row

FAULT_EXIT_ENV = "VLBATCH_FAULT_DECODE_EXIT"
FAULT_HANG_ENV = "VLBATCH_FAULT_DECODE_HANG"
FAULT_EXIT_CODE = 13
STARTUP_TIMEOUT_S = 120.0  # importing torch, PyAV and PyMuPDF on a loaded node can take a while
UNIT_KEYS = ("window_index", "page_index")  # what numbers a decoder's rows within one item
ROWS_AHEAD = 2  # rows the child may send before the parent's consumer took the first of them

_ARRAY = "\x00ndarray"  # marks where an array (or bytes) sat in a row; real row keys never start with NUL
_BYTES = "\x00bytes"
_SHARED = "\x00shared"  # an array in the sender's shared memory: [dtype, shape, slot, offset]
SHARED_MIN_BYTES = 64 << 10  # below this, the socket's copies cost less than the slot's
# Above this a message goes through the socket: slots never shrink, and ROWS_AHEAD + 1 of them stay mapped
# in both processes; a bigger row (a long window of large frames) takes long enough to decode that the
# socket's copies hardly count.
SHARED_MAX_BYTES = 64 << 20
_SLOT_GRAIN = 1 << 20  # slots grow in whole MiB
_ANCILLARY_SIZE = socket.CMSG_SPACE(4 * int_array("i").itemsize)  # room to see if more than one came
_PR_SET_PDEATHSIG = 1
_I32 = struct.Struct("!i")
_U64 = struct.Struct("!Q")
_LONG_LENGTH = _I32.pack(-1)  # then a u64 length, as multiprocessing frames messages over 2 GiB
_IOV_MAX = 512  # buffers per writev; Linux allows 1024

log = logging.getLogger(__name__)


# ---- fault injection ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """Misbehave on the first `times` attempts of items whose URI contains `substring`."""

    substring: str
    times: int = 1
    after_rows: int = 0


def parse_faults(spec: str | None, source: str = "fault spec") -> tuple[Fault, ...]:
    """'a.mp4:2,b.pdf:1:3' -> faults; trailing ':N' parts are counts, so URIs with '://' still work."""
    faults = []
    for entry in (spec or "").split(","):
        parts = entry.strip().split(":")
        numbers: list[int] = []
        while len(parts) > 1 and len(numbers) < 2 and parts[-1].strip().isdigit():
            numbers.insert(0, int(parts.pop()))
        substring = ":".join(parts).strip()
        if not substring:
            if entry.strip():
                raise ValueError(f"{source}: {entry!r} names no substring; write SUBSTRING[:TIMES[:AFTER]]")
            continue
        faults.append(Fault(substring, *numbers))
    return tuple(faults)


@dataclass(frozen=True)
class DecodeFaults:
    """Which items the child should crash or hang on (nothing, unless a test or a drill asks)."""

    exit: tuple[Fault, ...] = ()
    hang: tuple[Fault, ...] = ()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> DecodeFaults:
        env = os.environ if environ is None else environ
        return cls(
            exit=parse_faults(env.get(FAULT_EXIT_ENV), FAULT_EXIT_ENV),
            hang=parse_faults(env.get(FAULT_HANG_ENV), FAULT_HANG_ENV),
        )

    def for_item(self, uri: str, attempt: int) -> dict[str, Any] | None:
        """What the child must do on this attempt (0-based) of this item, or None."""
        for kind, faults in (("exit", self.exit), ("hang", self.hang)):
            for fault in faults:
                if fault.substring in uri and attempt < fault.times:
                    return {"kind": kind, "after_rows": fault.after_rows}
        return None


def _inject(fault: dict[str, Any]) -> None:
    if fault["kind"] == "exit":
        os._exit(FAULT_EXIT_CODE)
    libc = ctypes.PyDLL(None)  # PyDLL keeps the GIL during the call: stuck in C, as a spinning decoder is
    while True:
        libc.sleep(3600)


# ---- messages: JSON header + raw array bytes; big arrays through reused shared memory -------------------


class SharedSlots:
    """The sender's side of shared memory for big arrays: a few memfds used in turn. Each message's big
    arrays are copied into the next slot and only their place crosses the socket (plus the slot's
    descriptor when the slot is new or had to grow). The receiver copies them out before it acknowledges
    the row, and the sender never runs more than ROWS_AHEAD rows ahead, so with ROWS_AHEAD + 1 slots a slot
    is never written while the receiver still reads it.

    A decoder may also make its output right in the next slot (`allocate`, through `output_array`): then
    sending it copies nothing at all."""

    def __init__(self, count: int = ROWS_AHEAD + 1):
        self.slots: list[tuple[int, mmap.mmap, bool] | None] = [None] * count  # fd, memory, peer has it
        self.turn = 0
        self.pending: np.ndarray | None = None  # the array `allocate` handed out for the next message

    def _memory(self, index: int, nbytes: int) -> mmap.mmap:
        """Slot `index`, replaced by a bigger one if it holds less than `nbytes`."""
        slot = self.slots[index]
        if slot is None or len(slot[1]) < nbytes:
            if slot is not None:
                os.close(slot[0])  # the old mapping goes when the last array over it does
            fd = os.memfd_create("vlbatch-rows", os.MFD_CLOEXEC)
            size = max(1, -(-nbytes // _SLOT_GRAIN)) * _SLOT_GRAIN
            os.ftruncate(fd, size)
            self.slots[index] = slot = (fd, mmap.mmap(fd, size), False)
        return slot[1]

    def allocate(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised array at the start of the slot the next message will use."""
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        if not SHARED_MIN_BYTES <= count * dtype.itemsize <= SHARED_MAX_BYTES:
            return np.empty(shape, dtype=dtype)
        memory = self._memory(self.turn, count * dtype.itemsize)
        self.pending = np.frombuffer(memory, dtype, count, 0).reshape(shape)
        return self.pending

    def place(self, arrays: list[np.ndarray]) -> tuple[int, list[int], int | None]:
        """Put `arrays` in the next slot: (slot index, byte offsets, descriptor to send or None)."""
        pending, self.pending = self.pending, None
        index, self.turn = self.turn, (self.turn + 1) % len(self.slots)
        made_here = [
            pending is not None and _data_address(a) == _data_address(pending) and a.nbytes == pending.nbytes
            for a in arrays
        ]
        offsets, total = _layout(arrays, made_here)
        if any(made_here) and total > len(self.slots[index][1]):  # the slot must grow: copy everything
            made_here = [False] * len(arrays)
            offsets, total = _layout(arrays, made_here)
        memory = self._memory(index, total)
        for array, offset, done in zip(arrays, offsets, made_here, strict=True):
            if not done:
                np.copyto(np.frombuffer(memory, array.dtype, array.size, offset).reshape(array.shape), array)
        fd, memory, known = self.slots[index]
        self.slots[index] = (fd, memory, True)
        return index, offsets, None if known else fd

    def close(self) -> None:
        for slot in filter(None, self.slots):
            os.close(slot[0])
        self.slots = [None] * len(self.slots)
        self.pending = None


def _data_address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def _layout(arrays: list[np.ndarray], made_here: list[bool]) -> tuple[list[int], int]:
    """Byte offsets of the arrays in a slot and the bytes they take: an array made in the slot stays at 0,
    the others follow, each 64-byte aligned."""
    offsets, total = [0] * len(arrays), 0
    for array, here in zip(arrays, made_here, strict=True):
        if here:
            total = max(total, array.nbytes)
    for k, array in enumerate(arrays):
        if not made_here[k]:
            offsets[k] = total = -(-total // 64) * 64
            total += array.nbytes
    return offsets, total


_CHILD_SLOTS: SharedSlots | None = None  # set in the decode child


def output_array(shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
    """A new array for a decoder to fill with a row's pixels. In the decode child it lies in the shared
    memory the row will travel in, so sending it costs no copy; yield it in the decoder's next row, or
    drop it (the next call reuses the memory)."""
    if _CHILD_SLOTS is None:
        return np.empty(shape, dtype=dtype)
    return _CHILD_SLOTS.allocate(shape, dtype)


class SlotMaps:
    """The receiver's side: the sender's slots mapped read-only; arrays are copied out of them at once."""

    def __init__(self) -> None:
        self.maps: dict[int, mmap.mmap] = {}

    def replace(self, index: int, fd: int) -> None:
        old = self.maps.pop(index, None)
        if old is not None:
            old.close()
        self.maps[index] = mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ)

    def copy_out(self, marker: list[Any]) -> np.ndarray:
        """A new array holding the shared array a marker [dtype, shape, slot, offset] names."""
        dtype, shape, index, offset = np.dtype(marker[0]), tuple(marker[1]), marker[2], marker[3]
        memory, count = self.maps.get(index), math.prod(shape)
        if memory is None or not 0 <= offset <= len(memory) - count * dtype.itemsize:
            raise EOFError("a shared array lies outside the shared memory the sender gave")
        out = np.empty(shape, dtype=dtype)
        np.copyto(out, np.frombuffer(memory, dtype, count, offset).reshape(shape))
        return out

    def close(self) -> None:
        for memory in self.maps.values():
            memory.close()
        self.maps.clear()


class _Parts:
    """What `_flatten` takes out of a message: arrays to send inline and arrays to send through shared
    memory (their markers get the slot and offset once the slot is known)."""

    def __init__(self, slots: SharedSlots | None):
        self.inline: list[np.ndarray] = []
        self.shared: list[np.ndarray] = []
        self.shared_markers: list[list[Any]] = []
        self.slots = slots
        self.shared_bytes = 0

    def add_array(self, value: np.ndarray) -> dict[str, Any]:
        spec = [value.dtype.str, list(value.shape)]
        pending = self.slots.pending if self.slots is not None else None
        # An array made in the slot must go shared: the slot is written before the socket is.
        made_in_slot = (
            pending is not None and value.nbytes > 0 and _data_address(value) == _data_address(pending)
        )
        fits = SHARED_MIN_BYTES <= value.nbytes and self.shared_bytes + value.nbytes <= SHARED_MAX_BYTES
        if self.slots is not None and (made_in_slot or fits):
            self.shared.append(value)
            self.shared_markers.append(spec)
            self.shared_bytes += value.nbytes
            return {_SHARED: spec}
        self.inline.append(np.ascontiguousarray(value))
        return {_ARRAY: spec}


def _flatten(value: Any, parts: _Parts) -> Any:
    """`value` as JSON types; arrays and bytes go to `parts` and are replaced by a marker."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"row keys must be strings to cross the decode process boundary, not {key!r}")
            out[key] = _flatten(item, parts)
        return out
    if isinstance(value, list | tuple):
        return [_flatten(item, parts) for item in value]
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise TypeError("arrays of Python objects cannot cross the decode process boundary")
        return parts.add_array(value)
    if isinstance(value, bytes | bytearray | memoryview):
        parts.inline.append(np.frombuffer(value, dtype=np.uint8))
        return {_BYTES: len(parts.inline[-1])}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"a {type(value).__name__} cannot cross the decode process boundary; use JSON types")


def _unflatten(value: Any, inline: Iterator[np.ndarray], shared: Iterator[np.ndarray]) -> Any:
    if isinstance(value, dict):
        if _ARRAY in value:
            return next(inline)
        if _SHARED in value:
            return next(shared)
        if _BYTES in value:
            return next(inline).tobytes()
        return {key: _unflatten(item, inline, shared) for key, item in value.items()}
    if isinstance(value, list):
        return [_unflatten(item, inline, shared) for item in value]
    return value


def _array_specs(value: Any, inline: list[tuple[np.dtype, tuple[int, ...]]], shared: list[list[Any]]) -> None:
    """dtype and shape of each inline array in `value`, and the marker of each shared one, in the order
    `_flatten` met them."""
    if isinstance(value, dict):
        if _ARRAY in value:
            dtype, shape = value[_ARRAY]
            inline.append((np.dtype(dtype), tuple(shape)))
        elif _BYTES in value:
            inline.append((np.dtype(np.uint8), (value[_BYTES],)))
        elif _SHARED in value:
            shared.append(value[_SHARED])
        else:
            for item in value.values():
                _array_specs(item, inline, shared)
    elif isinstance(value, list):
        for item in value:
            _array_specs(item, inline, shared)


def _frame(nbytes: int) -> bytes:
    """The length prefix multiprocessing's Connection.send_bytes writes (so recv_bytes reads ours too)."""
    if nbytes > 0x7FFFFFFF:
        return _LONG_LENGTH + _U64.pack(nbytes)
    return _I32.pack(nbytes)


def _write_all(fd: int, buffers: list[memoryview]) -> None:
    """Write the buffers in order with writev: no joining into one big byte string, no copy in Python."""
    pending = [view for view in buffers if view.nbytes]
    while pending:
        _drop_written(pending, os.writev(fd, pending[:_IOV_MAX]))


def _drop_written(pending: list[memoryview], written: int) -> None:
    """Drop what went out; keep the rest of a buffer the kernel took only part of."""
    while written:
        if written >= pending[0].nbytes:
            written -= pending.pop(0).nbytes
        else:
            pending[0] = pending[0][written:]
            written = 0


class _Stalled(Exception):
    """No byte arrived for the timeout (inside `recv_message` only)."""


def _wait(poller: select.poll | None, timeout_ms: int) -> None:
    if poller is not None and not poller.poll(timeout_ms):
        raise _Stalled


def _read_into(
    fd: int, view: memoryview, poller: select.poll | None, timeout_ms: int, fds: list[int] | None = None
) -> None:
    """Fill `view` from `fd`, straight into its memory; _Stalled if `poller` sees nothing for the timeout.
    With `fds`, descriptors riding on these bytes are appended to it (the kernel hands one over with the
    first read that touches the bytes it was sent with); the caller closes them."""
    sock = socket.socket(fileno=fd) if fds is not None else None
    try:
        got = 0
        while got < view.nbytes:
            _wait(poller, timeout_ms)
            if sock is None:
                n = os.readv(fd, [view[got:]])
            else:
                n, ancillary, flags, _ = sock.recvmsg_into([view[got:]], _ANCILLARY_SIZE)
                for level, kind, data in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        received = int_array("i")
                        received.frombytes(data[: len(data) - len(data) % received.itemsize])
                        fds += received
                if flags & socket.MSG_CTRUNC or len(fds) > 1:
                    raise EOFError("a message came with more than one descriptor")
            if n == 0:
                raise EOFError("the peer closed the connection")
            got += n
    finally:
        if sock is not None:
            sock.detach()  # the descriptor stays the Connection's


def _read_length(fd: int, poller: select.poll | None, timeout_ms: int, fds: list[int] | None = None) -> int:
    """A frame's length: four bytes, or a -1 there and then eight."""
    head = bytearray(4)
    _read_into(fd, memoryview(head), poller, timeout_ms, fds)
    (nbytes,) = _I32.unpack(head)
    if nbytes == -1:
        head = bytearray(8)
        _read_into(fd, memoryview(head), poller, timeout_ms)
        (nbytes,) = _U64.unpack(head)
    return nbytes


def send_message(conn: Connection, message: dict[str, Any], slots: SharedSlots | None = None) -> None:
    """One message: its JSON header, then each inline array's bytes framed as a message of its own, all
    written from where they lie (one writev). With `slots`, arrays of SHARED_MIN_BYTES or more (up to
    SHARED_MAX_BYTES a message) are copied into shared memory instead and only their place crosses the
    socket."""
    parts = _Parts(slots)
    flat = _flatten(message, parts)
    new_fd = None
    if parts.shared:
        index, offsets, new_fd = slots.place(parts.shared)
        for spec, offset in zip(parts.shared_markers, offsets, strict=True):
            spec += [index, offset]
    header = json.dumps(flat).encode()
    buffers = [memoryview(_frame(len(header))), memoryview(header)]
    for array in parts.inline:
        data = memoryview(array.reshape(-1).view(np.uint8))
        buffers += [memoryview(_frame(data.nbytes)), data]
    fd = conn.fileno()
    if new_fd is not None:  # the slot's descriptor rides on the header's first bytes
        sock = socket.socket(fileno=fd)
        try:
            head = buffers[:2]
            _drop_written(
                head, sock.sendmsg(head, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, int_array("i", [new_fd]))])
            )
        finally:
            sock.detach()
        buffers = head + buffers[2:]
    _write_all(fd, buffers)


def recv_message(
    conn: Connection, timeout_s: float | None = None, slots: SlotMaps | None = None
) -> dict[str, Any] | None:
    """The next message, or None when `timeout_s` passes without a byte of it arriving (then, if the
    message had begun, the connection is out of step: the caller must drop it). EOFError when the peer is
    gone. Inline arrays are read straight into new arrays of the header's dtype and shape; shared ones are
    copied out of `slots` into new arrays (so the sender may reuse the memory once told)."""
    fd = conn.fileno()
    poller, timeout_ms = None, 0
    if timeout_s is not None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        timeout_ms = max(0, math.ceil(timeout_s * 1000))
    new_fds: list[int] = []  # the slot's descriptor, when the slot is new to us or grew
    try:
        header_bytes = bytearray(_read_length(fd, poller, timeout_ms, new_fds))
        _read_into(fd, memoryview(header_bytes), poller, timeout_ms)
        header = json.loads(header_bytes)
        specs: list[tuple[np.dtype, tuple[int, ...]]] = []
        markers: list[list[Any]] = []
        _array_specs(header, specs, markers)
        inline = []
        for dtype, shape in specs:
            array = np.empty(shape, dtype=dtype)
            flat = memoryview(array.reshape(-1).view(np.uint8))
            nbytes = _read_length(fd, poller, timeout_ms)
            if nbytes != flat.nbytes:
                raise EOFError(f"an array of {flat.nbytes} bytes arrived with {nbytes}")
            _read_into(fd, flat, poller, timeout_ms)
            inline.append(array)
        if markers and slots is None:
            raise EOFError("a shared array arrived on a connection that takes none")
        if new_fds:
            if not markers:
                raise EOFError("shared memory arrived with a message that has no place for it")
            slots.replace(markers[0][2], new_fds[0])  # one slot per message
        shared = [slots.copy_out(marker) for marker in markers]
    except _Stalled:
        return None
    finally:
        for x in new_fds:  # a mapping holds its memory by itself
            os.close(x)
    return _unflatten(header, iter(inline), iter(shared))


# ---- the child --------------------------------------------------------------------------------------------


def unit_identity(row: dict[str, Any], position: int) -> list[Any]:
    """What tells a row apart from its item's other rows: its window / page index, else its position."""
    present = [[key, row[key]] for key in UNIT_KEYS if key in row]
    return present[0] if present else ["#", position]


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so a hung child is never left spinning.

    Linux sends it when the parent *thread* that started us ends; decode actors call from one long-lived
    thread, and a child killed early is only restarted (a crash before it receives an item is free).
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _serve(conn: Connection, decode: Callable, request: dict[str, Any], slots: SharedSlots | None) -> None:
    """Decode one item, sending each row the parent does not have yet, then "end" (or "raise")."""
    send_message(conn, {"kind": "started"})
    have = {tuple(key) for key in request["skip"]}
    fault = request.get("fault")
    sent = acknowledged = 0
    try:
        if fault and fault["after_rows"] <= sent:
            _inject(fault)
        for position, row in enumerate(decode(request["row"])):
            key = unit_identity(row, position)
            if tuple(key) in have:
                continue
            while sent - acknowledged >= ROWS_AHEAD:
                acknowledged += recv_message(conn)["kind"] == "ack"
            send_message(conn, {"kind": "row", "key": key, "row": row}, slots)
            sent += 1
            if fault and fault["after_rows"] <= sent:
                _inject(fault)
        if fault:  # fewer rows than after_rows: misbehave at the end of the item
            _inject(fault)
    except Exception as e:  # the decoder's own guard failed; the parent turns this into an error row
        send_message(conn, {"kind": "raise", "message": f"{type(e).__name__}: {e}"})
        return
    send_message(conn, {"kind": "end"})


def child_main(fd: int, parent_pid: int) -> None:
    """Entry point of the decode child: build the decoder, then serve items until the parent hangs up."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    conn = Connection(fd)
    try:
        decode = pickle.loads(conn.recv_bytes())()  # the parent's own factory, not data from a file
    except Exception as e:
        send_message(conn, {"kind": "fatal", "message": f"{type(e).__name__}: {e}"})
        return
    send_message(conn, {"kind": "ready"})
    global _CHILD_SLOTS
    slots = _CHILD_SLOTS = SharedSlots() if hasattr(os, "memfd_create") else None  # else arrays go inline
    while True:
        try:
            request = recv_message(conn)
        except (EOFError, OSError):
            return
        if request["kind"] == "ack":  # for the last rows of the item before; nothing waits on them
            continue
        try:
            _serve(conn, decode, request, slots)
        except (BrokenPipeError, ConnectionResetError):
            return


# ---- the parent -------------------------------------------------------------------------------------------


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
            "from pipeline.isolation import child_main; child_main(int(sys.argv[2]), int(sys.argv[3]))"
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
