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

from pipeline.storage import ConditionalWritesUnsupported, OutputDir, PreconditionFailed

LOCK_NAME = "_vlbatch.lock"
LOCK_SETTLE_S = 1.0  # object-store lock: wait between writing it and reading it back
LOCK_HEARTBEAT_S = 30.0
LOCK_STALE_S = 300.0  # an object-store lock not rewritten for this long belongs to a dead run


class OutputLock:
    """One run at a time per output; a lock left by a killed process on this host is taken over.

    Local: a file created with O_EXCL. s3://: an object created with `If-None-Match: *`, so of two runs
    that race only one creates it, on any machine. The holder rewrites it every `LOCK_HEARTBEAT_S` with
    `If-Match` on the ETag it last wrote, so a rewrite never undoes another run's takeover; a lock not
    rewritten for `LOCK_STALE_S` (its run died on another machine) is taken over with `If-Match` on the
    ETag it was seen with, so of two runs taking over one dead lock, one wins. A run that finds its lock
    taken stops before its next commit. Where the store takes no conditional writes (gs://, or an S3
    store that answers 501), the lock is written after checking that none is held; on every store it is
    read back after `LOCK_SETTLE_S`, and only the run whose token is there goes on (a store that ignored
    the condition is caught there; without conditions, two runs starting within milliseconds could pass).
    """

    def __init__(self, out_dir: str | Path | OutputDir):
        self.out = OutputDir.of(out_dir)
        self.path = Path(self.out.path) / LOCK_NAME if self.out.local else self.out.uri(LOCK_NAME)
        self.token = secrets.token_hex(8)
        self.lost: dict | None = None  # the run that took this lock over, if one did
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._etag: str | None = None  # of the lock object this run last wrote, where writes are conditional

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
        # Look first even with a conditional delete: a store that ignores `If-Match` on DELETE would
        # otherwise remove the lock of a run that took this one over.
        seen = self.out.read_versioned(LOCK_NAME) if self.out.prefix == "s3://" else None
        if seen is not None:
            holder, etag = _parse(seen[0]), seen[1]
            if holder is None or holder.get("token") != self.token:
                return
            try:
                self.out.delete(LOCK_NAME, if_etag=etag if self.out.conditional else None)
            except PreconditionFailed:
                pass  # replaced between the look and the delete: not ours any more
            return
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
        try:
            self._etag = self._create_or_take_over() if self.out.conditional else None
        except ConditionalWritesUnsupported:
            self._etag = None
        if self._etag is None:
            holder = self._holder()
            if holder is not None and not self._is_dead(holder) and not self._is_stale(holder):
                raise self._busy(holder)
            self.out.write_bytes(LOCK_NAME, self._me())
        time.sleep(LOCK_SETTLE_S)  # without conditions, a run that raced us has written its own lock by now
        holder = self._holder()
        if holder is None or holder.get("token") != self.token:
            raise self._busy(holder or {"host": "?", "pid": "?"})
        _HELD[self.out.uri()] = self
        self._beat = threading.Thread(target=self._heartbeat, name="vlbatch-lock", daemon=True)
        self._beat.start()
        return self

    def _create_or_take_over(self) -> str:
        """Create the lock (`If-None-Match: *`), or replace a dead or stale one (`If-Match` on the ETag it
        was read with); the new ETag. Raises the busy error if a live run holds it."""
        for _ in range(3):
            try:
                return self.out.write_bytes(LOCK_NAME, self._me(), if_absent=True)
            except PreconditionFailed:
                pass
            seen = self.out.read_versioned(LOCK_NAME)
            if seen is None:
                continue  # released between our two requests: create it again
            holder, etag = _parse(seen[0]), seen[1]
            if holder is not None and holder.get("token") == self.token:
                return etag  # our own create, retried after its reply was lost
            if holder is not None and not self._is_dead(holder) and not self._is_stale(holder):
                raise self._busy(holder)
            try:
                return self.out.write_bytes(LOCK_NAME, self._me(), if_etag=etag)
            except PreconditionFailed:
                continue  # another run took it over first, or it was released: look again
        raise self._busy(self._holder() or {"host": "?", "pid": "?"})

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                if self._etag is not None:
                    self._beat_conditionally()
                else:
                    holder = self._holder()
                    if holder is not None and holder.get("token") != self.token:
                        self.lost = _describe(holder)
                    else:
                        self.out.write_bytes(LOCK_NAME, self._me())
            except Exception:  # noqa: BLE001 - a store hiccup must not end the heartbeat
                continue  # the next beat tries again, well within LOCK_STALE_S
            if self.lost is not None:
                return

    def _beat_conditionally(self) -> None:
        """Rewrite the lock only if it is still the version this run wrote; else see who has it."""
        try:
            self._etag = self.out.write_bytes(LOCK_NAME, self._me(), if_etag=self._etag)
            return
        except PreconditionFailed:
            pass
        seen = self.out.read_versioned(LOCK_NAME)
        holder = _parse(seen[0]) if seen is not None else None
        if holder is not None and holder.get("token") == self.token:
            self._etag = seen[1]  # our own rewrite, retried after its reply was lost
        elif holder is not None:
            self.lost = _describe(holder)
        else:  # deleted under us (by hand): recreate it, unless another run is quicker
            try:
                self._etag = self.out.write_bytes(LOCK_NAME, self._me(), if_absent=True)
            except PreconditionFailed:
                self.lost = _describe(self._holder() or {"host": "?", "pid": "?"})

    def _holder(self) -> dict | None:
        try:
            data = self.path.read_bytes() if self.out.local else self.out.read_bytes(LOCK_NAME)
        except OSError:
            return None
        return _parse(data) if data is not None else None

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


def _parse(data: bytes) -> dict | None:
    try:
        holder = json.loads(data)
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict) -> dict:
    return {k: holder.get(k) for k in ("host", "pid")}


_HELD: dict[str, OutputLock] = {}  # object-store locks this process holds, by output URI


def check_lock(out: OutputDir | None) -> None:
    """Before a commit to an object store: the lock this process took on it must still be its own."""
    lock = _HELD.get(out.uri()) if out is not None and not out.local else None
    if lock is not None:
        lock.check()
