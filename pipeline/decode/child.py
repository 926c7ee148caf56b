"""The decode child: builds the decoder once, then decodes the items the parent sends, row by row.

Rows go back as they are made, at most ROWS_AHEAD ahead of the parent's acknowledgements, so a slow
consumer holds the child back and a 300-page document is never held whole. A retried item arrives with the
units the parent already has, and the child drops those (dedup by unit index).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from pipeline.decode.shared_memory import ROWS_AHEAD, SharedSlots, use_in_this_process
from pipeline.decode.wire import recv_message, send_message
from pipeline.faults import inject

UNIT_KEYS = ("window_index", "page_index")  # what numbers a decoder's rows within one item
_PR_SET_PDEATHSIG = 1


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
            inject(fault)
        for position, row in enumerate(decode(request["row"])):
            key = unit_identity(row, position)
            if tuple(key) in have:
                continue
            while sent - acknowledged >= ROWS_AHEAD:
                acknowledged += recv_message(conn)["kind"] == "ack"
            send_message(conn, {"kind": "row", "key": key, "row": row}, slots)
            sent += 1
            if fault and fault["after_rows"] <= sent:
                inject(fault)
        if fault:  # fewer rows than after_rows: misbehave at the end of the item
            inject(fault)
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
    slots = SharedSlots() if hasattr(os, "memfd_create") else None  # else arrays go inline
    use_in_this_process(slots)
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
