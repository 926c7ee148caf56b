"""Shared memory for the decode child's big arrays: a few memfd slots the sender reuses, the receiver maps.

A page image or a window of frames is copied once into the next slot (or made there, `output_array`) and
only its place crosses the socket; the receiver copies it out before it acknowledges the row. The child
never runs more than ROWS_AHEAD rows ahead of the acknowledgements, so with ROWS_AHEAD + 1 slots a slot is
never written while the receiver still reads it.
"""

from __future__ import annotations

import math
import mmap
import os
from typing import Any

import numpy as np

ROWS_AHEAD = 2  # rows the child may send before the parent's consumer took the first of them
SHARED_MIN_BYTES = 64 << 10  # below this, the socket's copies cost less than the slot's
# Above this a message goes through the socket: slots never shrink, and ROWS_AHEAD + 1 of them stay mapped
# in both processes; a bigger row (a long window of large frames) takes long enough to decode that the
# socket's copies hardly count.
SHARED_MAX_BYTES = 64 << 20
_SLOT_GRAIN = 1 << 20  # slots grow in whole MiB


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

    @staticmethod
    def takes(nbytes: int, already: int = 0) -> bool:
        """Whether an array of `nbytes` goes through a slot, beside `already` bytes of the same message."""
        return SHARED_MIN_BYTES <= nbytes and already + nbytes <= SHARED_MAX_BYTES

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
            pending is not None and data_address(a) == data_address(pending) and a.nbytes == pending.nbytes
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


def data_address(array: np.ndarray) -> int:
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


_CHILD_SLOTS: SharedSlots | None = None  # the decode child's own, set by `use_in_this_process`


def use_in_this_process(slots: SharedSlots | None) -> None:
    """Make `output_array` allocate in `slots` (the decode child calls this once)."""
    global _CHILD_SLOTS
    _CHILD_SLOTS = slots


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
