"""The benchmark scripts still run end to end (tiny sizes; their figures are for people, not for tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, timeout: float = 600) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_gpu_engine_bench_runs_its_cpu_smoke_and_agrees_with_transformers():
    # triton: through Triton's interpreter, which the subprocess inherits from conftest's environment
    out = run_script("bench/gpu_engine.py", "--smoke", "--variants", "auto,triton-nographs", "--profile", "2")
    assert "engine [auto]" in out and "engine start (triton attention, no CUDA graphs)" in out
    assert "profile of 2 requests (sdpa attention, no CUDA graphs)" in out and "aten::" in out
    assert "(8/8 identical)" in out and "best transformers batch, requests/s)" in out


def test_pipeline_bench_measures_every_variant(tmp_path):
    out = run_script(
        "bench/pipeline.py",
        "--no-e2e",
        "--repeats",
        "1",
        "--videos",
        "1",
        "--seconds",
        "3",
        "--pdfs",
        "1",
        "--pages",
        "2",
        "--root",
        str(tmp_path),
    )
    for line in (
        "raw library",
        "raw + text layer",
        "raw + resize",
        "decoder, in process",
        "decode stage of a job",
    ):
        assert line in out
    assert out.count("ratio to raw") == 6  # decoder and stage, for documents and both video sizes


@pytest.mark.slow
def test_scale_bench_runs_a_job_and_its_resume_scan(tmp_path):
    out = run_script(
        "bench/scale.py", "--items", "30", "--root", str(tmp_path), "--json", str(tmp_path / "f.json")
    )
    assert "30 items:" in out and "items/s" in out and "item list" in out
    (run,) = json.loads((tmp_path / "f.json").read_text())["runs"]
    assert run["items"] == 30 and run["driver_peak_rss_mib"] > 0 and run["resume_scan_s"] >= 0
