"""One run at a time per output directory (`OutputLock`), and the check every commit makes that this run
still holds it (`check_lock`)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from pipeline.storage import OutputDir

LOCK_NAME = "_vlbatch.lock"
LOCK_SETTLE_S = 1.0  # object-store lock: wait between writing it and reading it back
LOCK_HEARTBEAT_S = 30.0
LOCK_STALE_S = 300.0  # an object-store lock not rewritten for this long belongs to a dead run


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
