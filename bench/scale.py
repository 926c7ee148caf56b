"""Does the driver stay small as jobs grow? Tiny items end to end, and what in the driver grows with them.

    python bench/scale.py [--items 10000 100000] [--root DIR] [--json FILE]

For each count: that many generated 28x28 PNGs (1,000 to a folder), one OCR job over them with the tiny
random checkpoint and `max_new_tokens: 1`, run as a user runs it (`vlbatch run`, a local Ray on this
machine). Measured: the driver process's peak RSS (VmHWM) and items/s over the whole run, then the same
command again over the finished output (the resume scan: it finds every item done and starts no Ray).

In this process, for each count: the memory and time of expanding the inputs (the item list the driver
holds), of the rows Ray Data's `from_items` takes, and of scanning the finished output for resume. The
per-item figures are what the driver grows with; besides them it holds Ray Data's stats of each block every
stage produced until the dataset ends: bounded on the input side (`pipeline.chain.input_blocks`), one per
pack after the packer; rows are buffered up to `limits.rows_per_file`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.figures import report  # noqa: E402
from model.testing import make_tiny_checkpoint  # noqa: E402

PER_FOLDER = 1000


def make_items(root: Path, n: int, seed: int = 0) -> Path:
    """`n` distinct 28x28 PNGs under `root`, `PER_FOLDER` to a folder; made once, kept for reruns."""
    done = root / f".made-{n}"
    if done.exists():
        return root
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(n, 3), dtype=np.uint8)
    for i in range(n):
        folder = root / f"{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        pixels = np.empty((28, 28, 3), np.uint8)
        pixels[:] = colours[i]
        pixels[i % 28, :, :] = 255 - colours[i]  # a line whose place differs: no two files alike
        Image.fromarray(pixels).save(folder / f"{i:07d}.png", compress_level=1)
    done.touch()
    return root


def job_spec(inputs: Path, model: Path, out: Path) -> dict:
    return {
        "kind": "ocr_documents",
        "inputs": [str(inputs)],
        "output": str(out),
        "model": str(model),
        "dtype": "float32",
        "device": "cpu",
        "target_longest_side": 28,
        "sampling": {"max_new_tokens": 1},
        "resources": {"gpus_per_worker": 0},
    }


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_driver(spec_path: Path) -> dict:
    """`vlbatch run` in a fresh process: its wall time, exit status and the driver's peak memory: all of it
    (VmHWM), and apart its private memory (RssAnon) and the shared pages it touched (RssShmem: Ray's
    object store, mapped into the driver)."""
    cmd = [str(Path(sys.executable).parent / "vlbatch"), "run", str(spec_path), "--no-progress"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"VmHWM": 0, "RssAnon": 0, "RssShmem": 0}
    while proc.poll() is None:
        for field in peak:
            try:
                peak[field] = max(peak[field], rss_kib(proc.pid, field))
            except (OSError, ValueError):
                pass
        time.sleep(0.2)
    wall = time.perf_counter() - started
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-2000:]}\n{err[-4000:]}")
    mib = {field: round(kib / 1024, 1) for field, kib in peak.items()}
    return {
        "wall_s": round(wall, 2),
        "driver_peak_rss_mib": mib["VmHWM"],
        "driver_peak_private_mib": mib["RssAnon"],
        "driver_peak_shared_mib": mib["RssShmem"],
        "line": out.strip(),
    }


def in_process(inputs: Path, out: Path) -> dict:
    """Memory (RSS growth, MiB) and time of the driver's per-item state, measured here one at a time."""
    from pipeline.sources import expand_inputs
    from pipeline.writer import scan_output

    me = os.getpid()
    gc.collect()
    base = rss_kib(me, "VmRSS")
    t = time.perf_counter()
    items = expand_inputs([str(inputs)], "document")
    expand_s = time.perf_counter() - t
    after_items = rss_kib(me, "VmRSS")
    rows = [asdict(it) for it in items]  # what build_dataset hands to ray.data.from_items
    after_rows = rss_kib(me, "VmRSS")
    del rows
    gc.collect()
    before_scan = rss_kib(me, "VmRSS")
    t = time.perf_counter()
    state = scan_output(out, uri_key="uri")
    scan_s = time.perf_counter() - t
    after_scan = rss_kib(me, "VmRSS")
    n = len(items)
    assert len(state.ok_items) == n, f"{out}: {len(state.ok_items)} items ok of {n}"
    mib = lambda kib: round(kib / 1024, 1)
    return {
        "expand_s": round(expand_s, 2),
        "items_mib": mib(after_items - base),
        "from_items_rows_mib": mib(after_rows - after_items),
        "resume_scan_s": round(scan_s, 2),
        "resume_scan_mib": mib(after_scan - before_scan),
    }


def measure(root: Path, model: Path, n: int) -> dict:
    inputs = make_items(root / f"items-{n}", n)
    out = root / f"out-{n}"
    spec_path = root / f"job-{n}.json"
    spec_path.write_text(json.dumps(job_spec(inputs, model, out)))
    first = run_driver(spec_path)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "finished", manifest.get("error")
    assert manifest["counts"]["ok"] == n, manifest["counts"]
    rerun = run_driver(spec_path)  # every item is done: the scan and the manifest, no Ray
    return {
        "items": n,
        "wall_s": first["wall_s"],
        "items_per_s": round(n / first["wall_s"], 1),
        "driver_peak_rss_mib": first["driver_peak_rss_mib"],
        "driver_peak_private_mib": first["driver_peak_private_mib"],
        "driver_peak_shared_mib": first["driver_peak_shared_mib"],
        "rerun_wall_s": rerun["wall_s"],
        "rerun_driver_peak_rss_mib": rerun["driver_peak_rss_mib"],
        **in_process(inputs, out),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--root", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="vlbatch-scale-bench-"))
    model = root / "tiny"
    if not (model / "config.json").is_file():
        make_tiny_checkpoint(model)
    rows = [measure(root, model, n) for n in sorted(args.items)]
    lines = [
        f"{r['items']:>7,} items: {r['items_per_s']:.1f} items/s ({r['wall_s']:.0f} s), driver peak RSS "
        f"{r['driver_peak_rss_mib']:.0f} MiB (private {r['driver_peak_private_mib']:.0f}, object store pages "
        f"{r['driver_peak_shared_mib']:.0f}); rerun over the finished output {r['rerun_wall_s']:.1f} s "
        f"(scan {r['resume_scan_s']:.2f} s); item list {r['items_mib']:.0f} MiB, scan "
        f"{r['resume_scan_mib']:.0f} MiB"
        for r in rows
    ]
    if len(rows) > 1:
        # Per item by difference between the smallest and the largest run: what is fixed cancels out.
        a, b = rows[0], rows[-1]
        per_item = lambda key: (b[key] - a[key]) * 2**20 / (b["items"] - a["items"])
        lines.append(
            f"peak RSS x{b['driver_peak_rss_mib'] / a['driver_peak_rss_mib']:.2f} for "
            f"x{b['items'] / a['items']:.0f} items; the driver's private memory grows by "
            f"{per_item('driver_peak_private_mib'):.0f} bytes per item, of which the item list "
            f"{per_item('items_mib'):.0f} and Ray Data's input rows {per_item('from_items_rows_mib'):.0f}"
        )
    report("\n".join(lines), {"runs": rows}, args.json)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
