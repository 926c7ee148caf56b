"""What a run prints while it works: one progress line a person can read, and Ray kept quiet.

On a terminal the line is redrawn in place; in a log (stdout not a terminal: `vlbatch logs`, CI, nohup) it
is printed once a minute. Ray's own per-operator progress and INFO lines come back with `--verbose`.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, TextIO

TERMINAL_EVERY_S = 0.5  # redraws of the line in place
LOG_EVERY_S = 60.0  # lines appended to a log


class ProgressLine:
    """Items done / total, units, rate and errors so far of one job, counted as rows reach the driver.

    A thread redraws it on time, so the clock moves while the first results are still being made (models
    loading, long videos decoding).
    """

    def __init__(self, label: str, items_total: int, unit: str, stream: TextIO | None = None):
        self.label, self.items_total, self.unit = label, items_total, unit
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty()
        self.every_s = TERMINAL_EVERY_S if self.tty else LOG_EVERY_S
        self.started = time.monotonic()
        self.items = self.units = 0
        self.errors: Counter[str] = Counter()  # by stage
        self.width = 0  # of the last line drawn in place, to blank what a shorter one leaves
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.ticker = threading.Thread(target=self._tick, name="vlbatch-progress", daemon=True)
        self.ticker.start()

    def rows(self, rows: Iterable[dict[str, Any]]) -> None:
        """Unit rows that reached the driver (results of the last stage)."""
        self.units += sum(1 for _ in rows)

    def item(self, rows: list[dict[str, Any]]) -> None:
        """An item whose rows all arrived: it counts as done, its error rows as errors of their stage."""
        self.items += 1
        self.errors.update(r.get("error_stage") or "?" for r in rows if r.get("status") != "ok")

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.units / elapsed if elapsed > 0 else 0.0
        errors = sum(self.errors.values())
        stages = ", ".join(f"{stage} {n}" for stage, n in sorted(self.errors.items()))
        return (
            f"{self.label}: items {self.items}/{self.items_total} | {self.unit} {self.units} | "
            f"{rate:.2f} {self.unit}/s | errors {errors}{f' ({stages})' if stages else ''} | "
            f"{_clock(elapsed)}"
        )

    def _tick(self) -> None:
        while not self.stopped.wait(self.every_s):
            self.show()

    def show(self) -> None:
        with self.lock:
            text = self.line()
            if self.tty:
                self.stream.write("\r" + text.ljust(self.width))
                self.width = len(text)
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Stop the redraws and end the line drawn in place (the job's summary line follows)."""
        self.stopped.set()
        self.ticker.join()
        if self.tty:
            self.show()
            with self.lock:
                self.stream.write("\n")
                self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


def quiet_local_ray(verbose: bool) -> None:
    """Before `ray.init` starts a local Ray: without `verbose`, its warning that it enabled token auth
    goes (Ray's default, kept: it is what a local cluster should have).

    Not silenced, for want of a switch in Ray: one error-level `core_worker.cc` line per process saying
    that a Ray Data actor has "constructor arguments in the object store and max_restarts > 0". Ray Data
    passes every actor a handle and object refs it keeps alive for the whole run (ray-project/ray#57733);
    RAY_BACKEND_LOG_LEVEL would hide it only by making every Ray process print a line of its own.
    """
    if not verbose:
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def ray_logging_level(verbose: bool) -> int:
    """The level of the driver's `ray` logger, for `ray.init(logging_level=...)`."""
    return logging.INFO if verbose else logging.WARNING


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's console output on the driver: INFO lines (plans, start, end of each dataset) only with
    `verbose`; its advice on how to turn its own progress bars on never, since vlbatch prints its own.
    Its log file in the session directory keeps everything."""
    import ray.data  # noqa: F401  (configures the ray.data loggers)

    for handler in logging.getLogger("ray.data").handlers:
        if handler.get_name() == "console":
            handler.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if verbose else logging.ERROR)
