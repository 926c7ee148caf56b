"""Engine vs transformers' padded batched generate on the same random weights, same process (CPU).

    python bench/engine.py [--requests 32] [--new-tokens 64] [--hf-batch 32] [--repeat 1]

Builds a mid-size random Qwen2-VL checkpoint (hidden 512, 8 layers, vision depth 8, the real vocabulary),
runs the same image requests of mixed sizes through our engine and through
`Qwen2VLForConditionalGeneration.generate` (left padding, greedy, end-of-sequence ignored), and prints
requests/s, generated tokens/s and the ratio. The outputs of both are compared token by token.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model import Engine, EngineConfig, Processor, Qwen2VL, Request, SamplingParams  # noqa: E402
from model.testing import make_tiny_checkpoint  # noqa: E402

MID_SIZE = dict(
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    vision=dict(depth=8, embed_dim=256, num_heads=4),
)
QUESTIONS = [
    "Describe this image.",
    "What text is in the picture?",
    "Give a one-line caption.",
    "List the objects you see.",
]


def make_workload(processor: Processor, n: int, min_side: int, max_side: int, seed: int) -> list[dict]:
    """Processor inputs of `n` single-image prompts, sides drawn uniformly in [min_side, max_side]."""
    rng = np.random.default_rng(seed)
    inputs = []
    for i in range(n):
        h, w = (int(x) for x in rng.integers(min_side, max_side + 1, size=2))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        content = [{"type": "image", "image": image}, {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]
        inputs.append(processor([{"role": "user", "content": content}]))
    return inputs


def run_engine(engine: Engine, inputs: list[dict], new_tokens: int):
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = engine.generate([Request.from_inputs(i, params) for i in inputs])
    return time.perf_counter() - start, [o.token_ids for o in outputs], engine.stats


def hf_batch(inputs: list[dict], pad_id: int) -> dict:
    """Left-padded batch of single-image prompts in the layout transformers' generate takes."""
    ids = [torch.as_tensor(i["input_ids"]).reshape(-1) for i in inputs]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, x in enumerate(ids):
        input_ids[row, width - len(x) :] = x
        mask[row, width - len(x) :] = 1
    return dict(
        input_ids=input_ids,
        attention_mask=mask,
        pixel_values=torch.cat([i["pixel_values"] for i in inputs]),
        image_grid_thw=torch.cat([i["image_grid_thw"] for i in inputs]),
    )


def run_transformers(model, inputs: list[dict], new_tokens: int, batch: int, pad_id: int):
    def generate(chunk: list[dict], n: int) -> list[list[int]]:
        args = hf_batch(chunk, pad_id)
        with torch.inference_mode():
            out = model.generate(
                **args, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id
            )
        return out[:, args["input_ids"].shape[1] :].tolist()

    start = time.perf_counter()
    tokens = []
    for i in range(0, len(inputs), batch):
        tokens.extend(generate(inputs[i : i + batch], new_tokens))
    return time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=32, help="transformers' batch size (padded)")
    ap.add_argument("--min-side", type=int, default=224)
    ap.add_argument("--max-side", type=int, default=672)
    ap.add_argument("--max-batch-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each, alternating; the fastest counts")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "mid", **MID_SIZE)
        model = Qwen2VL.from_pretrained(path)
        processor = Processor.from_pretrained(path)
        inputs = make_workload(processor, args.requests, args.min_side, args.max_side, args.seed)
        prompt_tokens = sum(torch.as_tensor(i["input_ids"]).numel() for i in inputs)
        print(
            f"workload: {args.requests} image requests, sides {args.min_side}-{args.max_side} px, "
            f"{prompt_tokens} prompt tokens, {args.new_tokens} new tokens each; torch threads "
            f"{torch.get_num_threads()}"
        )
        config = EngineConfig(
            max_batch_tokens=args.max_batch_tokens, max_num_seqs=args.requests, kv_cache_bytes=512 << 20
        )
        engine = Engine(model, config)
        run_engine(engine, inputs[:1], 2)  # warm-up
        hf = None
        if not args.skip_hf:
            from transformers import Qwen2VLForConditionalGeneration

            hf = Qwen2VLForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
            pad_id = processor.tokenizer.token_id("<|endoftext|>")
            run_transformers(hf, inputs[:1], 2, 1, pad_id)  # warm-up
        # Alternate the two and keep each one's fastest run: other load on the machine hits both alike.
        ours_s = hf_s = float("inf")
        for _ in range(args.repeat):
            seconds, ours_tokens, stats = run_engine(engine, inputs, args.new_tokens)
            ours_s = min(ours_s, seconds)
            if hf is not None:
                seconds, hf_tokens = run_transformers(hf, inputs, args.new_tokens, args.hf_batch, pad_id)
                hf_s = min(hf_s, seconds)
        generated = sum(len(t) for t in ours_tokens)
        print(
            f"engine:       {args.requests / ours_s:8.2f} requests/s  "
            f"{generated / ours_s:9.1f} generated tokens/s"
            f"  ({ours_s:.1f} s, {stats.steps} steps, vision {stats.vision_seconds:.1f} s)"
        )
        if hf is None:
            return
        hf_generated = sum(len(t) for t in hf_tokens)
        print(
            f"transformers: {args.requests / hf_s:8.2f} requests/s  "
            f"{hf_generated / hf_s:9.1f} generated tokens/s"
            f"  ({hf_s:.1f} s, batch {args.hf_batch}, padded)"
        )
        same = sum(a == b for a, b in zip(ours_tokens, hf_tokens))
        print(
            f"ratio (engine / transformers, requests/s): {hf_s / ours_s:.2f}x "
            f"(best of {args.repeat}); identical greedy outputs: {same}/{args.requests}"
        )


if __name__ == "__main__":
    main()
