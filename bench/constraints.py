"""What JSON-schema constraints cost per engine step: the same batch with and without a caption schema.

    python bench/constraints.py [--requests 32] [--new-tokens 384] [--threads 0]

Builds the mid-size random checkpoint of bench/engine.py (the real 151,936-token vocabulary, so the masks are
real size), sends `--requests` image prompts constrained to a caption schema, then the same prompts without
it for as many tokens each as the constrained run generated. Prints the time llguidance spent filling masks
per step against the step's time (it runs beside the model), the time steps waited for masks after the
model had finished, and the per-token cost of the constrained run over the plain one.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import MID_SIZE, make_workload  # noqa: E402
from bench.figures import report  # noqa: E402
from model import Engine, EngineConfig, Processor, Request, SamplingParams  # noqa: E402
from model.testing import make_tiny_checkpoint  # noqa: E402

CAPTION_SCHEMA = {
    "type": "object",
    "properties": {
        "summary": {"type": "string", "maxLength": 200},
        "shot_type": {"enum": ["wide", "medium", "close-up", "aerial", "screen"]},
        "people": {"type": "integer", "minimum": 0, "maximum": 1000},
        "objects": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 5},
        "on_screen_text": {"type": ["string", "null"], "maxLength": 80},
        "safe": {"type": "boolean"},
    },
    "required": ["summary", "shot_type", "people", "objects", "on_screen_text", "safe"],
    "additionalProperties": False,
}


def run(engine: Engine, inputs: list[dict], lengths: list[int] | None, new_tokens: int) -> dict:
    """One batch: constrained (lengths None) or plain, each request generating its length of tokens."""
    reqs = []
    for i, inp in enumerate(inputs):
        if lengths is None:
            params = SamplingParams(max_new_tokens=new_tokens, json_schema=CAPTION_SCHEMA)
        else:
            params = SamplingParams(max_new_tokens=lengths[i], ignore_eos=True)
        reqs.append(Request.from_inputs(inp, params))
    started = time.perf_counter()
    outputs = engine.generate(reqs)
    wall = time.perf_counter() - started
    s = engine.stats
    return {
        "wall_s": wall,
        "steps": s.steps,
        "decode_only_steps": s.decode_only_steps,
        "decode_only_s": s.decode_only_seconds,
        "mask_s": s.mask_seconds,
        "mask_wait_s": s.mask_wait_seconds,
        "tokens": [o.num_generated_tokens for o in outputs],
        "finish": [o.finish_reason for o in outputs],
        "texts": [o.text for o in outputs],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=384)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "mid", **MID_SIZE)
        engine = Engine.from_pretrained(path, EngineConfig(max_batch_tokens=8192))
        inputs = make_workload(Processor.from_pretrained(path), args.requests, 224, 336, seed=0)
        engine.grammars().matcher(
            CAPTION_SCHEMA
        )  # the tokenizer index is built once per engine, not per step
        constrained = run(engine, inputs, None, args.new_tokens)
        plain = run(engine, inputs, constrained["tokens"], args.new_tokens)
    valid = sum(
        f == "stop" and bool(json.loads(t)) for f, t in zip(constrained["finish"], constrained["texts"])
    )
    c_tokens = sum(constrained["tokens"])
    figures = {
        "requests": args.requests,
        "valid_stopped": valid,
        "generated_tokens": c_tokens,
        "steps": constrained["steps"],
        "mask_ms_per_step": round(1000 * constrained["mask_s"] / constrained["steps"], 2),
        "step_ms": round(1000 * constrained["wall_s"] / constrained["steps"], 2),
        "mask_over_step": round(constrained["mask_s"] / constrained["wall_s"], 3),
        "mask_wait_over_wall": round(constrained["mask_wait_s"] / constrained["wall_s"], 3),
        "plain_wall_s": round(plain["wall_s"], 2),
        "constrained_wall_s": round(constrained["wall_s"], 2),
        "constrained_over_plain": round(constrained["wall_s"] / plain["wall_s"], 3),
    }
    summary = (
        f"{args.requests} requests under a caption schema: {valid} valid and stopped, {c_tokens} tokens in "
        f"{figures['steps']} steps; masks {figures['mask_ms_per_step']} ms per step of "
        f"{figures['step_ms']} ms = {figures['mask_over_step']:.3f} of the step (beside the model), "
        f"waited on {figures['mask_wait_over_wall']:.3f} of the time; constrained run "
        f"{figures['constrained_over_plain']:.3f}x the plain run's time for the same tokens"
    )
    report(summary, figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
