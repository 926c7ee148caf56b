"""The decode child's wire format: a JSON header plus raw array bytes over a socket pair, never pickled.

A child that a hostile file has taken over cannot make the parent run code: only JSON types, arrays and bytes
cross. Arrays are framed as multiprocessing frames messages and written from where they lie (writev); big
ones go through shared memory (`shared_memory.SharedSlots`) and only their place crosses the socket, with
the slot's descriptor riding on the header when the slot is new to the receiver.
"""

from __future__ import annotations

import json
import math
import os
import select
import socket
import struct
from array import array as int_array
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from pipeline.decode.shared_memory import SharedSlots, SlotMaps, data_address

_ARRAY = "\x00ndarray"  # marks where an array (or bytes) sat in a row; real row keys never start with NUL
_BYTES = "\x00bytes"
_SHARED = "\x00shared"  # an array in the sender's shared memory: [dtype, shape, slot, offset]
_ANCILLARY_SIZE = socket.CMSG_SPACE(4 * int_array("i").itemsize)  # room to see if more than one came
_I32 = struct.Struct("!i")
_U64 = struct.Struct("!Q")
_LONG_LENGTH = _I32.pack(-1)  # then a u64 length, as multiprocessing frames messages over 2 GiB
_IOV_MAX = 512  # buffers per writev; Linux allows 1024


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
            pending is not None and value.nbytes > 0 and data_address(value) == data_address(pending)
        )
        if self.slots is not None and (made_in_slot or self.slots.takes(value.nbytes, self.shared_bytes)):
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
