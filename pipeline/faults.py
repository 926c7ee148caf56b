"""Fault drills, for tests and failure drills: make a decode child or a GPU worker misbehave on purpose.

Each drill is an environment variable; SUBSTRING is matched against an item's URI, several entries are
separated by commas:

    VLBATCH_FAULT_DECODE_EXIT="SUBSTRING[:TIMES[:AFTER_ROWS]]"  the decode child os._exit(13)s on them
    VLBATCH_FAULT_DECODE_HANG="SUBSTRING[:TIMES[:AFTER_ROWS]]"  the decode child sleeps forever in C
                                                                (holding the GIL)
    VLBATCH_FAULT_INFER_EXIT="SUBSTRING[:TIMES[:PACKS]]"         a GPU worker os._exit(17)s after generating
                                                                a pack that holds a matching item, holding
                                                                PACKS packs at the time (default 0: any)

The decode drills act on the first TIMES attempts (default 1) of each matching item, after sending AFTER_ROWS
rows (default 0); they are read where the decoder is built. The GPU worker's drill is read on the driver and
counted in files under the output's `_faults/` folder, so that restarted workers see the earlier exits: at
most TIMES exits in all.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAULT_EXIT_ENV = "VLBATCH_FAULT_DECODE_EXIT"
FAULT_HANG_ENV = "VLBATCH_FAULT_DECODE_HANG"
FAULT_EXIT_CODE = 13
FAULT_INFER_EXIT_ENV = "VLBATCH_FAULT_INFER_EXIT"
FAULT_INFER_EXIT_CODE = 17
PACKS_WAIT_S = 30.0  # the GPU drill waits this long at most for the packs it should exit with
FAULTS_DIR = "_faults"  # the GPU drill's counters, in the output directory (ignored by dataset readers)


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


def inject(fault: dict[str, Any]) -> None:
    """Misbehave as the drill says: exit at once, or hang inside C code holding the GIL."""
    if fault["kind"] == "exit":
        os._exit(FAULT_EXIT_CODE)
    libc = ctypes.PyDLL(None)  # PyDLL keeps the GIL during the call: stuck in C, as a spinning decoder is
    while True:
        libc.sleep(3600)


def claim_fault(fault: Fault, fault_dir: str, note: dict[str, Any] | None = None) -> bool:
    """True for the first `fault.times` claims of this fault, by whatever process makes them.

    Each claim is a file created exclusively, so concurrent or restarted workers never count one twice; it
    holds `note` (as JSON), what the worker was doing when it exited.
    """
    tag = hashlib.sha1(fault.substring.encode()).hexdigest()[:12]
    for k in range(fault.times):
        try:
            path = os.path.join(fault_dir, f"infer-exit-{tag}-{k}")
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(note or {}, f)
        return True
    return False


@dataclass(frozen=True)
class InferFaults:
    """The GPU worker's drill: exit the whole worker process, as a GPU fault or the OOM killer would."""

    faults: tuple[Fault, ...] = ()
    fault_dir: str | None = None

    @classmethod
    def for_output(cls, output: str, environ: dict[str, str] | None = None) -> InferFaults:
        """The drill of VLBATCH_FAULT_INFER_EXIT (read on the driver), counted under `output`/_faults/."""
        env = os.environ if environ is None else environ
        faults = parse_faults(env.get(FAULT_INFER_EXIT_ENV), FAULT_INFER_EXIT_ENV)
        if not faults:
            return cls()
        fault_dir = Path(output).resolve() / FAULTS_DIR
        fault_dir.mkdir(parents=True, exist_ok=True)
        return cls(faults, str(fault_dir))

    def maybe_exit(self, uris: list[str], packs_in_flight: Callable[[], int] = lambda: 1) -> None:
        """Exit now if a pack with these URIs is one the drill claims. A fault's third number is the packs
        the worker must hold when it exits: it waits for them (up to PACKS_WAIT_S), then notes in the
        claim how many it held."""
        for fault in self.faults:
            if not any(fault.substring in uri for uri in uris):
                continue
            deadline = time.monotonic() + PACKS_WAIT_S
            while packs_in_flight() < fault.after_rows and time.monotonic() < deadline:
                time.sleep(0.01)
            if claim_fault(fault, self.fault_dir, {"packs_in_flight": packs_in_flight()}):
                os._exit(FAULT_INFER_EXIT_CODE)
