"""Does a job keep the engine's speed? The same page rows through the engine alone and through a real job.

    python bench/infer_stage.py [--pages 48] [--new-tokens 48] [--device cpu] [--dtype float32]

Writes `--pages` page-sized images and the mid-size random checkpoint of bench/engine.py, then measures
(a) the engine alone, every row at once, and (b) `vlbatch ocr-documents` over the same images with the
job's default budgets, each twice: with `--new-tokens` and with 1 new token. The difference of the two
runs is the time spent decoding the extra tokens, so model loading, decode, prefill and Ray's start cancel
out; decode tokens/s of (b) over (a) is how much of the engine's speed the GPU stage keeps. The whole
job's output tokens/s against the engine alone's on the same rows is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import MID_SIZE  # noqa: E402
from bench.figures import report  # noqa: E402
from model.testing import make_tiny_checkpoint  # noqa: E402


def make_pages(root: Path, n: int, seed: int = 0) -> Path:
    """`n` page-like PNGs (A4 proportions, dark text-like strokes on white) of 900 x 1273 pixels."""
    rng = np.random.default_rng(seed)
    pages = root / "pages"
    pages.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        page = np.full((1273, 900, 3), 255, np.uint8)
        for line in range(60, 1200, 28):
            width = int(rng.integers(300, 800))
            page[line : line + 12, 60 : 60 + width] = rng.integers(0, 120, (12, width, 3), dtype=np.uint8)
        Image.fromarray(page).save(pages / f"page{i:03d}.png")
    return pages


def job_spec(pages: Path, model: Path, out: Path, new_tokens: int, args) -> dict:
    return {
        "kind": "ocr_documents",
        "inputs": [str(pages)],
        "output": str(out),
        "model": str(model),
        "dtype": args.dtype,
        "device": args.device,
        "sampling": {"max_new_tokens": new_tokens},
        "resources": {"decode_workers": 1, "gpus_per_worker": 1 if args.device == "cuda" else 0},
    }


def engine_alone(spec: dict, new_tokens: int) -> tuple[float, int]:
    """(seconds, generated tokens) of the job's rows through one engine, all at once."""
    from pipeline.decode.stage import DecodeUnits, make_decoder
    from pipeline.infer import Backend, UnitPrompt
    from pipeline.prepare import Prepare
    from pipeline.rows import INPUT_IDS, pixels_at
    from pipeline.sources import expand_inputs
    from schemas import PageRecord, validate_job

    job = validate_job({**spec, "sampling": {"max_new_tokens": new_tokens}})
    r = job.resources
    decode = DecodeUnits(make_decoder(job, isolated=False), PageRecord, "bench")
    items = expand_inputs(job.inputs, "document")
    rows = pa.concat_tables(t for it in items for t in decode(pa.Table.from_pylist([it.__dict__])))
    prepared = Prepare(job.model, PageRecord, job.prompt)(rows)
    backend = Backend(job.model, job.dtype, job.device, r.max_step_tokens, max_num_seqs=r.max_seqs_in_flight)
    prompts = prepared.column(INPUT_IDS).to_pylist()
    units = [UnitPrompt(ids, pixels_at(prepared, i)) for i, ids in enumerate(prompts)]
    requests = [backend.request(u, job.sampling) for u in units]
    started = time.perf_counter()
    outputs = backend.engine.generate(requests)
    return time.perf_counter() - started, sum(o.num_generated_tokens for o in outputs)


def through_a_job(spec: dict, new_tokens: int, out: Path) -> tuple[float, int]:
    """(seconds of the whole `vlbatch` run, generated tokens) in a fresh process, as a user runs it."""
    import subprocess

    path = out.with_suffix(".json")
    path.write_text(json.dumps({**spec, "output": str(out), "sampling": {"max_new_tokens": new_tokens}}))
    started = time.perf_counter()
    cmd = [str(Path(sys.executable).parent / "vlbatch"), "run", str(path), "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - started
    manifest = json.loads((out / "_manifest.json").read_text())
    return wall, manifest["run"]["generated_tokens"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--root", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="vlbatch-infer-bench-"))
    model = root / "mid-size"
    if not (model / "config.json").is_file():
        make_tiny_checkpoint(model, **MID_SIZE)
    pages = make_pages(root, args.pages)
    spec = job_spec(pages, model, root / "unused", args.new_tokens, args)
    n = args.new_tokens

    # The job first: its child processes must not share the CPU with an engine in this process.
    job_long, job_tokens = through_a_job(spec, n, root / f"out-{n}")
    job_short, job_tokens_1 = through_a_job(spec, 1, root / "out-1")
    eng_long, eng_tokens = engine_alone(spec, n)
    eng_short, eng_tokens_1 = engine_alone(spec, 1)

    eng_decode = (eng_tokens - eng_tokens_1) / max(eng_long - eng_short, 1e-9)
    job_decode = (job_tokens - job_tokens_1) / max(job_long - job_short, 1e-9)
    figures = {
        "pages": args.pages,
        "new_tokens": n,
        "device": args.device,
        "torch_threads_here": __import__("torch").get_num_threads(),
        "engine_s": [round(eng_long, 2), round(eng_short, 2)],
        "job_s": [round(job_long, 2), round(job_short, 2)],
        "engine_decode_tok_s": round(eng_decode, 1),
        "job_decode_tok_s": round(job_decode, 1),
        "decode_ratio": round(job_decode / eng_decode, 3),
        "engine_output_tok_s": round(eng_tokens / eng_long, 1),
        "job_output_tok_s": round(job_tokens / job_long, 1),
        "output_ratio": round((job_tokens / job_long) / (eng_tokens / eng_long), 3),
    }
    summary = (
        f"{args.pages} pages, {n} new tokens, {args.device}: decode {job_decode:.1f} tok/s in the job vs "
        f"{eng_decode:.1f} engine alone = {figures['decode_ratio']:.2f}x (goal >= 0.9); whole job "
        f"{figures['job_output_tok_s']} output tok/s vs {figures['engine_output_tok_s']} = "
        f"{figures['output_ratio']:.2f}x"
    )
    report(summary, figures, args.json)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
