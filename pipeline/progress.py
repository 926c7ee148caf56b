"""What a run prints while it works: progress a person can read, one line per stage, and Ray kept quiet.

    caption_videos: items 812/2000 | windows 9731 | 4.12 windows/s | errors 3 (decode 3) | 0:39:20
      decode   items 840/2000 in | windows 10090 out | 4.27 windows/s
      prepare  windows 10012 out | 4.24 windows/s
      infer    windows 9760 out | 4.13 windows/s

The first line is what reached the driver (items whose results are all in, units, error rows by stage);
the stage lines are Ray Data's own row counts of each stage, read at each step of its executor. On a
terminal the block is redrawn in place; in a log (stdout not a terminal: `vlbatch logs`, CI, nohup) it is
printed once a minute. Ray's own per-operator progress and INFO lines come back with `--verbose`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, TextIO

TERMINAL_EVERY_S = 0.5  # redraws in place
LOG_EVERY_S = 60.0  # blocks appended to a log
# Stages shown, by the name of their Ray Data map function (operators may be fused: "A->B").
STAGES = {"DecodeUnits": "decode", "Prepare": "prepare", "Infer": "infer"}


class ProgressLine:
    """Items done / total, units, rate and errors so far of one job, counted as rows reach the driver,
    with a line per stage.

    A thread redraws it on time, so the clock moves while the first results are still being made (models
    loading, long videos decoding).
    """

    active: ProgressLine | None = None  # the one Ray Data's executor reports stage counts to

    def __init__(self, label: str, items_total: int, unit: str, stream: TextIO | None = None):
        self.label, self.items_total, self.unit = label, items_total, unit
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty()
        self.every_s = TERMINAL_EVERY_S if self.tty else LOG_EVERY_S
        self.started = time.monotonic()
        self.items = self.units = 0
        self.errors: Counter[str] = Counter()  # by stage
        self.stages: dict[str, tuple[int, int]] = {}  # stage -> (rows in, rows out)
        self.drawn = 0  # lines of the block last drawn in place
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        ProgressLine.active = self
        self.ticker = threading.Thread(target=self._tick, name="vlbatch-progress", daemon=True)
        self.ticker.start()

    def rows(self, rows: Iterable[dict[str, Any]]) -> None:
        """Unit rows that reached the driver (results of the last stage)."""
        self.units += sum(1 for _ in rows)

    def item(self, rows: list[dict[str, Any]]) -> None:
        """An item whose rows all arrived: it counts as done, its error rows as errors of their stage."""
        self.items += 1
        self.errors.update(r.get("error_stage") or "?" for r in rows if r.get("status") != "ok")

    def stage(self, name: str, rows_in: int, rows_out: int) -> None:
        """Rows a stage has taken in and put out so far (from Ray Data's executor)."""
        self.stages[name] = (rows_in, rows_out)

    def lines(self) -> list[str]:
        elapsed = time.monotonic() - self.started
        errors = sum(self.errors.values())
        by_stage = ", ".join(f"{stage} {n}" for stage, n in sorted(self.errors.items()))
        lines = [
            f"{self.label}: items {self.items}/{self.items_total} | {self.unit} {self.units} | "
            f"{self._rate(self.units, elapsed)} | errors {errors}{f' ({by_stage})' if by_stage else ''} | "
            f"{_clock(elapsed)}"
        ]
        for name in STAGES.values():
            if name in self.stages:
                rows_in, rows_out = self.stages[name]
                took = f"items {rows_in}/{self.items_total} in | " if name == "decode" else ""
                lines.append(
                    f"  {name:<8} {took}{self.unit} {rows_out} out | {self._rate(rows_out, elapsed)}"
                )
        return lines

    def _rate(self, count: int, elapsed: float) -> str:
        return f"{count / elapsed if elapsed > 0 else 0.0:.2f} {self.unit}/s"

    def _tick(self) -> None:
        while not self.stopped.wait(self.every_s):
            self.show()

    def show(self) -> None:
        with self.lock:
            lines = self.lines()
            if self.tty:  # back to the block's first line, each line rewritten and cleared to its end
                up = f"\x1b[{self.drawn - 1}F" if self.drawn > 1 else ""
                self.stream.write(up + "\r" + "\n".join(f"{ln}\x1b[K" for ln in lines))
                self.drawn = len(lines)
            else:
                self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Stop the redraws and show the last state (the job's summary line follows)."""
        self.stopped.set()
        self.ticker.join()
        if ProgressLine.active is self:
            ProgressLine.active = None
        self.show()
        if self.tty:
            with self.lock:
                self.stream.write("\n")
                self.stream.flush()


class StageCounts:
    """A Ray Data execution callback (`DataContext.custom_execution_callback_classes`): at each step of
    the executor, the rows each of our stages has taken in and put out, handed to the active line.

    The counts are Ray Data's operator metrics, read from its executor's topology; where a Ray version
    names them otherwise the stage lines are left out, never the run.
    """

    def before_execution_starts(self, executor: Any) -> None:
        pass

    def on_execution_step(self, executor: Any) -> None:
        line = ProgressLine.active
        if line is None:
            return
        try:
            for op in executor._topology:
                parts = op.name.split("->")
                for function, stage in STAGES.items():
                    if any(f"({function})" in part for part in parts):
                        metrics = op.metrics
                        line.stage(
                            stage, metrics.num_row_inputs_received, metrics.rows_task_outputs_generated
                        )
        except (AttributeError, TypeError):
            return

    def after_execution_succeeds(self, executor: Any) -> None:
        self.on_execution_step(executor)

    def after_execution_fails(self, executor: Any, error: Exception) -> None:
        pass


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


def quiet_local_ray(verbose: bool) -> None:
    """Before `ray.init` starts a local Ray: without `verbose`, its warning that it enabled token auth
    goes (Ray's default, kept: it is what a local cluster should have)."""
    if not verbose:
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


# Lines Ray's C++ core worker writes to the driver's stderr on every healthy run, which no user can act
# on. The one today: an error-level line that a Ray Data actor has "constructor arguments in the object
# store and max_restarts > 0" (Ray Data hands each actor object refs it keeps alive for the whole run,
# ray-project/ray#57733); Ray has no switch for it short of a log level for every Ray process.
RAY_NOISE = (
    r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store and "
    r"max_restarts > 0",
)
# A child process, so that what a crash of the driver writes (a faulthandler traceback) still comes out.
_STDERR_FILTER = """
import re, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the driver: its last words must come out
noise = [re.compile(p.encode()) for p in sys.argv[1:]]
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    if not any(p.search(line) for p in noise):
        out.write(line)
        out.flush()
"""
_filtered_stderr: dict[str, Any] = {}


def drop_ray_noise(verbose: bool) -> None:
    """Before `ray.init` (whose core worker writes to fd 2 from C++): without `verbose`, this process's
    stderr goes through a filter that drops the RAY_NOISE lines and passes every other line on."""
    import atexit
    import os
    import subprocess

    if verbose or _filtered_stderr:
        return
    sys.stderr.flush()
    read, write = os.pipe()
    original = os.dup(2)
    # A session of its own: Ctrl-C on the driver's process group must not reach it. It ends when the
    # last writer of the pipe (this process, then any Ray process started from it) is gone.
    child = subprocess.Popen(
        [sys.executable, "-c", _STDERR_FILTER, *RAY_NOISE],
        stdin=read,
        stdout=original,
        close_fds=True,
        start_new_session=True,
    )
    os.close(read)
    os.dup2(write, 2)
    os.close(write)
    _filtered_stderr.update(child=child, original=original)

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(original, 2)  # our end of the pipe closes: the filter drains it and exits
        try:
            child.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass  # Ray's processes still hold the pipe; the filter ends with them

    atexit.register(restore)


def ray_logging_level(verbose: bool) -> int:
    """The level of the driver's `ray` logger, for `ray.init(logging_level=...)`."""
    return logging.INFO if verbose else logging.WARNING


def configure_ray_data_output(verbose: bool) -> None:
    """Ray Data's console output on the driver: INFO lines (plans, start, end of each dataset) only with
    `verbose`; its advice on how to turn its own progress bars on never, since vlbatch prints its own.
    Its log file in the session directory keeps everything. Also registers the stage counts."""
    import ray.data

    callbacks = ray.data.DataContext.get_current().custom_execution_callback_classes
    if StageCounts not in callbacks:
        callbacks.append(StageCounts)

    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if verbose else logging.ERROR)
