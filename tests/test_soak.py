"""Soak (issue #6): 1,000 small items through a local job with the tiny checkpoint; every item accounted for,
and the peak memory of the driver and of the workers does not grow with the item count (250 vs 1,000).

Tiny PNGs as one-page documents and one generated token: the cost measured here is the pipeline's per-item
machinery, which is what could leak. Four times the items is enough to see a leak of it; the sizes users
have (10,000 and 100,000 items) are measured by bench/scale.py, whose figures are in the README.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import ray  # noqa: F401  (puts the psutil that Ray ships on the path)
from media import make_image

from pipeline.driver import run_job
from schemas import validate_job

pytestmark = pytest.mark.slow

MiB = 1 << 20
SIZES = (250, 1000)


@dataclass
class MemoryPeaks:
    """Highest memory seen while a job ran: the driver (this process) and Ray's processes under it."""

    driver_start: int = 0
    driver: int = 0  # RSS
    workers_total: int = 0  # private memory (RSS less shared pages, so the object store is not counted)
    worker_max: int = 0
    worker_name: str = ""
    samples: int = 0

    def line(self, label: str) -> str:
        growth = (self.driver - self.driver_start) / MiB
        workers, largest = self.workers_total / MiB, self.worker_max / MiB
        return (
            f"{label}: driver peak RSS {self.driver / MiB:.0f} MiB (+{growth:.0f} during the run), workers "
            f"peak {workers:.0f} MiB private in all, largest {largest:.0f} MiB ({self.worker_name}), "
            f"{self.samples} samples"
        )


@dataclass
class Sampler:
    """Samples memory every `every_s` in a thread until stopped."""

    every_s: float = 0.25
    peaks: MemoryPeaks = field(default_factory=MemoryPeaks)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        self.peaks.driver = max(self.peaks.driver, me.memory_info().rss)
        total = 0
        for p in me.children(
            recursive=True
        ):  # the session's local Ray: GCS, raylet, workers, decode children
            try:
                info = p.memory_info()
                private = info.rss - info.shared
                name = p.name()
            except psutil.Error:
                continue
            total += private
            if private > self.peaks.worker_max:
                self.peaks.worker_max, self.peaks.worker_name = private, name
        self.peaks.workers_total = max(self.peaks.workers_total, total)
        self.peaks.samples += 1

    def __enter__(self) -> Sampler:
        import psutil

        self.peaks.driver_start = psutil.Process().memory_info().rss
        self.sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@pytest.fixture(scope="module")
def soak_inputs(tmp_path_factory) -> dict[int, Path]:
    """Directories of n distinct tiny PNGs (each its own item), one per size."""
    root = tmp_path_factory.mktemp("soak")
    dirs = {}
    for n in SIZES:
        d = root / f"in-{n}"
        d.mkdir()
        for i in range(n):
            make_image(d / f"p{i:05d}.png", size=(28 + i % 7, 28 + i % 5), index=i % 256)
        dirs[n] = d
    return dirs


def soak_job(inputs: Path, output: Path, checkpoint: Path):
    return validate_job(
        {
            "kind": "ocr_documents",
            "inputs": [str(inputs)],
            "output": str(output),
            "model": str(checkpoint),
            "dtype": "float32",
            "device": "cpu",
            "target_longest_side": 28,
            "sampling": {"max_new_tokens": 1},
            "resources": {
                "decode_workers": 2,
                "cpus_per_decode_worker": 0.5,
                "gpu_workers": 1,
                "gpus_per_worker": 0,
                "max_batch_tokens": 2048,
            },
            # Small files: the driver holds at most this many finished rows, whatever the item count.
            "limits": {"rows_per_file": 256},
        }  # fmt: skip
    )


def run_measured(job) -> tuple[object, MemoryPeaks, float]:
    started = time.perf_counter()
    with Sampler() as sampler:
        summary = run_job(job, progress=False)
    return summary, sampler.peaks, time.perf_counter() - started


def test_soak_every_item_accounted_for_in_bounded_memory(
    soak_inputs, tiny_checkpoint, ray_local, tmp_path, capsys
):
    # A short run first, so that one-time costs (imports, Ray Data's first execution) count in neither.
    warm = soak_job(soak_inputs[SIZES[0]] / "p000[0-4]*.png", tmp_path / "out-warm", tiny_checkpoint)
    assert run_measured(warm)[0].run.units == 50
    peaks = {}
    for n in SIZES:
        job = soak_job(soak_inputs[n], tmp_path / f"out-{n}", tiny_checkpoint)
        summary, peaks[n], wall_s = run_measured(job)
        with capsys.disabled():
            print(f"\nsoak {n} items in {wall_s:.0f} s; " + peaks[n].line(f"{n} items"))
        df = pd.read_parquet(job.output)
        names = sorted(Path(u).name for u in df.uri)
        assert names == sorted(os.listdir(soak_inputs[n])), "an item is missing or repeated"
        assert df.item_id.is_unique and (df.status == "ok").all() and (df.page_index == 0).all()
        assert (df.generated_tokens == 1).all() and (df.visual_tokens > 0).all()
        assert summary.finished and summary.run.units == n and summary.run.errors == 0
    small, big = (peaks[n] for n in SIZES)
    report = (small.line(f"{SIZES[0]}"), big.line(f"{SIZES[1]}"))
    # 4x the items must not mean 4x the memory. What does grow a little is Ray Data's bookkeeping per block
    # (one block per item here; pipeline.chain caps the input blocks), about 10 KiB an item.
    assert big.driver < small.driver * 1.25, report
    assert big.driver - big.driver_start < 2 * (small.driver - small.driver_start) + 32 * MiB, report
    assert big.worker_max < small.worker_max * 1.1 + 32 * MiB, report
    assert big.workers_total < small.workers_total * 1.1 + 128 * MiB, report
