"""Engine vs transformers' generate with the real Qwen2-VL-2B shapes and random bf16 weights (for a GPU).

    python bench/gpu_engine.py [--requests 512] [--hf-batch 32,128] [--hf-time-budget 180]
                               [--variants auto,sdpa,triton]   # our engine's attention/graph settings
    python bench/gpu_engine.py --smoke          # tiny config on CPU: checks the script end to end

Self-contained: no checkpoint, tokenizer or network. It builds the 2B config from model/configs, random
weights on the device, the same weights in transformers' Qwen2VLForConditionalGeneration (4.5x or 5.x API),
and a workload of single-image prompts of mixed sizes (random pixel patches; prompt ids in the Qwen2-VL chat
layout). Prints requests/s, generated tokens/s, the vision tower's TFLOP/s against the card's peak, and the
ratio to transformers. If transformers would run past its time budget, it runs the first requests only and
the rates are compared per request (the sizes are drawn i.i.d., so the subsets are alike).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention import sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model.config import Qwen2VLConfig  # noqa: E402
from model.engine import Engine, EngineConfig, Request, SamplingParams  # noqa: E402
from model.engine.model_runner import CUDA_SDPA_BACKENDS  # noqa: E402
from model.pixels import smart_resize  # noqa: E402
from model.qwen2vl import Qwen2VL  # noqa: E402
from model.testing import tiny_config, to_saved_layout  # noqa: E402

PEAK_BF16_TFLOPS = 989.0  # dense bf16, H100/H200 SXM (datasheet)
# <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n
CHAT_HEAD = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198]
CHAT_TAIL = [151645, 198, 151644, 77091, 198]  # <|im_end|>\n<|im_start|>assistant\n


def build_config(smoke: bool) -> Qwen2VLConfig:
    if smoke:
        return tiny_config(num_hidden_layers=2, vision={"depth": 2})
    return Qwen2VLConfig.from_json(ROOT / "model" / "configs" / "qwen2-vl-2b-instruct.json")


@torch.no_grad()
def build_ours(config: Qwen2VLConfig, device: torch.device, dtype: torch.dtype, seed: int) -> Qwen2VL:
    """Random weights: matrices N(0, 0.02), norm scales 1, biases 0 (as an untrained checkpoint would be)."""
    with torch.device(device):
        model = Qwen2VL(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, 0.02, generator=gen)
        elif "norm" in name or "ln_q" in name:
            p.fill_(1.0) if name.endswith("weight") else p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)
    return model.to(dtype).eval().requires_grad_(False)


def build_transformers(config: Qwen2VLConfig, ours: Qwen2VL, device: torch.device, dtype: torch.dtype):
    """The same weights in transformers' Qwen2-VL (config read from a published-layout config.json)."""
    import transformers
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config.to_hf_dict()))
        hf_config = AutoConfig.from_pretrained(tmp)
    with torch.device(device):
        try:  # transformers >= 4.56 names it dtype; older versions torch_dtype
            model = Qwen2VLForConditionalGeneration._from_config(
                hf_config, attn_implementation="sdpa", dtype=dtype
            )
        except TypeError:
            model = Qwen2VLForConditionalGeneration._from_config(
                hf_config, attn_implementation="sdpa", torch_dtype=dtype
            )
    state = to_saved_layout(ours.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"transformers {transformers.__version__} key mismatch: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.to(device=device, dtype=dtype).eval()


def make_workload(config: Qwen2VLConfig, n: int, min_side: int, max_side: int, seed: int, dtype: torch.dtype):
    """n single-image prompts: (input ids, pixel patches, grid) with sides drawn in [min_side, max_side]."""
    gen = torch.Generator().manual_seed(seed)
    v = config.vision
    merge2 = v.spatial_merge_size**2
    items = []
    for _ in range(n):
        h, w = (int(x) for x in torch.randint(min_side, max_side + 1, (2,), generator=gen))
        h, w = smart_resize(h, w, factor=v.patch_size * v.spatial_merge_size)
        grid = (1, h // v.patch_size, w // v.patch_size)
        patches = grid[1] * grid[2]
        question = torch.randint(1000, 50000, (8,), generator=gen).tolist()
        ids = (
            CHAT_HEAD
            + [config.vision_start_token_id]
            + [config.image_token_id] * (patches // merge2)
            + [config.vision_end_token_id]
            + question
            + CHAT_TAIL
        )
        pixels = torch.randn(patches, v.patch_dim, generator=gen).to(dtype)
        items.append((ids, pixels, torch.tensor([grid])))
    return items


def vision_flops(config: Qwen2VLConfig, grids: list[tuple[int, int, int]]) -> float:
    """Matmul FLOPs of the vision tower over these images (patch embed, blocks, attention, merger)."""
    v = config.vision
    e, m, depth = v.embed_dim, v.mlp_dim, v.depth
    patches = sum(t * h * w for t, h, w in grids)
    per_patch = 2 * v.patch_dim * e + depth * 2 * e * (4 * e + 2 * m)
    attention = depth * sum(t * 4 * (h * w) ** 2 * e for t, h, w in grids)
    merged = 4 * e
    merger = patches // v.spatial_merge_size**2 * 2 * merged * (merged + v.hidden_size)
    return patches * per_patch + attention + merger


def device_check(device: torch.device) -> None:
    """Tiny float32 model on the device: engine greedy tokens vs the simple generate, each request alone,
    with prefill cut in chunks and a cache too small for all (images, a video, text only)."""
    from model.engine import generate

    config = tiny_config(num_hidden_layers=2, vision={"depth": 2})
    model = build_ours(config, device, torch.float32, seed=1)
    items = make_workload(config, 6, 56, 280, seed=1, dtype=torch.float32)
    question = [1000 + i for i in range(12)]
    items.append((CHAT_HEAD + question + CHAT_TAIL, None, None))
    video_grid = (2, 4, 6)
    video_ids = (
        CHAT_HEAD
        + [config.vision_start_token_id]
        + [config.video_token_id] * 12
        + [config.vision_end_token_id]
        + question
        + CHAT_TAIL
    )
    video_pixels = torch.randn(48, config.vision.patch_dim, generator=torch.Generator().manual_seed(2))
    requests = [
        Request(ids, p, g, sampling=SamplingParams(max_new_tokens=8, ignore_eos=True)) for ids, p, g in items
    ]
    requests.append(
        Request(
            video_ids,
            pixel_values_videos=video_pixels,
            video_grid_thw=torch.tensor([video_grid]),
            sampling=SamplingParams(max_new_tokens=8, ignore_eos=True),
        )
    )
    refs = []
    for r in requests:
        inputs = {
            "input_ids": torch.tensor([r.prompt_token_ids]),
            "pixel_values": r.pixel_values,
            "image_grid_thw": r.image_grid_thw,
            "pixel_values_videos": r.pixel_values_videos,
            "video_grid_thw": r.video_grid_thw,
        }
        refs.append(generate(model, inputs, max_new_tokens=8, stop_token_ids=[])[0])
    for name, cfg in (
        ("packed", EngineConfig(max_batch_tokens=4096, num_kv_blocks=256)),
        (
            "chunked+small cache",
            EngineConfig(max_batch_tokens=48, num_kv_blocks=40, block_size=16, max_vision_patches=64),
        ),
        ("packed, sdpa", EngineConfig(max_batch_tokens=4096, num_kv_blocks=256, attention_backend="sdpa")),
    ):
        engine = Engine(model, cfg)
        outputs = engine.generate(requests)
        same = sum(o.token_ids == ref for o, ref in zip(outputs, refs))
        print(
            f"device check ({name}; {describe(engine)}): {same}/{len(refs)} requests identical to generate "
            f"run alone; {engine.stats.graph_steps} graphed decode steps"
        )


def describe(engine: Engine) -> str:
    graphs = engine.runner.decode_graphs
    captured = f"{len(graphs.graphs)} CUDA graphs" if graphs and graphs.graphs else "no CUDA graphs"
    return f"{engine.runner.backend} attention, {captured}"


def variant_config(name: str, base: EngineConfig) -> EngineConfig:
    """'auto' (the engine's own choice), or a backend name with '-nographs' to keep decode steps eager."""
    backend, _, rest = name.partition("-")
    if rest not in ("", "nographs"):
        raise SystemExit(f"--variants: {name!r} is not 'auto', BACKEND or BACKEND-nographs")
    return dataclasses.replace(
        base, attention_backend=None if backend == "auto" else backend, cuda_graphs=rest != "nographs"
    )


def workload_requests(items, new_tokens: int) -> list[Request]:
    """The workload as engine requests: greedy, exactly `new_tokens` each (EOS ignored)."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return [Request(ids, pixels, grid, sampling=params) for ids, pixels, grid in items]


def run_ours(model, items, new_tokens: int, config: EngineConfig, device: torch.device):
    t0 = time.perf_counter()
    engine = Engine(model, config)
    print(f"engine start ({describe(engine)}): {time.perf_counter() - t0:.1f} s")
    requests = workload_requests(items, new_tokens)
    engine.generate(requests[: min(8, len(requests))])  # warm-up: kernels, allocator
    _sync(device)
    start = time.perf_counter()
    outputs = engine.generate(requests)
    _sync(device)
    seconds = time.perf_counter() - start
    errors = [o.error for o in outputs if o.finish_reason == "error"]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    tokens = [o.token_ids for o in outputs]
    stats = engine.stats
    del engine
    return seconds, tokens, stats


def run_transformers(
    hf, items, new_tokens: int, batch: int, limit: int, budget_s: float, device, pad_id: int
):
    """Padded batches through generate until `limit` requests are done or the time budget is spent."""

    def generate(chunk, n):
        width = max(len(ids) for ids, _, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, (ids, _, _) in enumerate(chunk):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        args = dict(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            pixel_values=torch.cat([p for _, p, _ in chunk]).to(device),
            image_grid_thw=torch.cat([g for _, _, g in chunk]).to(device),
        )
        # The engine's SDPA kernels for transformers too: cuDNN's re-plans for every new length.
        backends = sdpa_kernel(CUDA_SDPA_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), backends:
            out = hf.generate(
                **args, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id
            )
        return out[:, width:].tolist()

    generate(items[:2], 2)  # warm-up
    _sync(device)
    start = time.perf_counter()
    tokens: list[list[int]] = []
    for i in range(0, min(limit, len(items)), batch):
        tokens.extend(generate(items[i : min(i + batch, limit)], new_tokens))
        if time.perf_counter() - start > budget_s:
            break
    _sync(device)
    return time.perf_counter() - start, tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_ours(model, items, new_tokens: int, config: EngineConfig, device: torch.device) -> None:
    """Where the time goes: torch.profiler over one generate() of `items`, top ops by device time."""
    from torch.profiler import ProfilerActivity, profile

    engine = Engine(model, config)
    requests = workload_requests(items, new_tokens)
    engine.generate(requests[:2])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        engine.generate(requests)
        _sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(f"profile of {len(requests)} requests ({describe(engine)}):")
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))


def report_ours(variant, seconds, tokens, stats, n, config, grids, device) -> None:
    generated = sum(len(t) for t in tokens)
    print(
        f"engine [{variant}]: {n / seconds:8.2f} requests/s  {generated / seconds:10.1f} generated tokens/s  "
        f"({seconds:.1f} s, {stats.steps} steps, {stats.preemptions} preemptions)"
    )
    if stats.decode_only_steps:
        print(
            f"  decode-only steps: {stats.decode_only_steps} ({stats.graph_steps} as CUDA graphs), "
            f"{1000 * stats.decode_only_seconds / stats.decode_only_steps:.1f} ms each; "
            f"{stats.prefill_tokens} prefill tokens, {stats.decode_tokens} decode tokens"
        )
    vis_tflops = vision_flops(config, grids) / max(stats.vision_seconds, 1e-9) / 1e12
    peak = (
        f", {100 * vis_tflops / PEAK_BF16_TFLOPS:.1f}% of the {PEAK_BF16_TFLOPS:.0f} TFLOP/s bf16 peak"
        if device.type == "cuda"
        else ""
    )
    print(
        f"  vision tower: {vis_tflops:.1f} TFLOP/s over {stats.vision_seconds:.2f} s "
        f"({100 * stats.vision_seconds / seconds:.0f}% of the run){peak}"
    )


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--hf-requests", type=int, default=0, help="cap on transformers' requests (0: all)")
    ap.add_argument("--hf-time-budget", type=float, default=180.0, help="seconds before transformers stops")
    ap.add_argument(
        "--hf-batch",
        type=lambda x: [int(b) for b in x.split(",")],
        default=[32, 128],
        help="transformers' batch sizes to try, comma-separated; the ratio uses the fastest",
    )
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--min-side", type=int, default=224)
    ap.add_argument("--max-side", type=int, default=672)
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-vision-patches", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--variants",
        default="auto",
        help="our engine's settings to run, comma-separated: auto, or flash/triton/sdpa, each optionally "
        "with -nographs (eager decode steps); the ratio uses the fastest",
    )
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="after the timed runs, profile N requests through the first variant and print the top kernels",
    )  # fmt: skip
    ap.add_argument("--no-check", action="store_true", help="skip the tiny float32 check on the GPU")
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU, few requests")
    args = ap.parse_args()
    if args.smoke:
        args.requests, args.hf_batch, args.new_tokens = min(args.requests, 8), [4], 8
        args.min_side, args.max_side = 56, 224
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    import transformers

    print(f"device {card}, torch {torch.__version__}, transformers {transformers.__version__}, dtype {dtype}")
    if device.type == "cuda" and not args.no_check:
        device_check(device)
    config = build_config(args.smoke)
    t0 = time.perf_counter()
    model = build_ours(config, device, dtype, args.seed)
    items = make_workload(config, args.requests, args.min_side, args.max_side, args.seed, dtype)
    grids = [tuple(g[0].tolist()) for _, _, g in items]
    prompt_tokens = sum(len(ids) for ids, _, _ in items)
    print(
        f"built model and {len(items)} requests in {time.perf_counter() - t0:.1f} s: sides "
        f"{args.min_side}-{args.max_side} px, {prompt_tokens} prompt tokens "
        f"({prompt_tokens / len(items):.0f}/request), {args.new_tokens} new tokens each"
    )

    base_config = EngineConfig(
        max_batch_tokens=args.max_batch_tokens,
        max_num_seqs=args.max_num_seqs,
        max_model_len=4096,
        max_vision_patches=args.max_vision_patches,
        kv_cache_bytes=None if device.type == "cuda" else 256 << 20,
    )
    best_ours = None
    variants = args.variants.split(",")
    for variant in variants:
        ours_s, tokens, stats = run_ours(
            model, items, args.new_tokens, variant_config(variant, base_config), device
        )
        report_ours(variant, ours_s, tokens, stats, len(items), config, grids, device)
        if best_ours is None or ours_s < best_ours[0]:
            best_ours = (ours_s, tokens, variant)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next variant sizes its KV cache from free memory
    ours_s, ours_tokens, best_variant = best_ours
    if args.profile:
        profiled = variant_config(variants[0], base_config)
        profile_ours(model, items[: args.profile], args.new_tokens, profiled, device)
    if args.skip_hf:
        return

    if device.type == "cuda":
        torch.cuda.empty_cache()
    hf = build_transformers(config, model, device, dtype)
    del model
    limit = args.hf_requests or len(items)
    ours_rate = len(items) / ours_s
    best = 0.0
    for batch in args.hf_batch:
        try:
            hf_s, hf_tokens = run_transformers(
                hf, items, args.new_tokens, batch, limit, args.hf_time_budget, device, config.bos_token_id
            )
        except torch.cuda.OutOfMemoryError:
            print(f"transformers: batch {batch} ran out of GPU memory")
            torch.cuda.empty_cache()
            continue
        n_hf = len(hf_tokens)
        hf_generated = sum(len(t) for t in hf_tokens)
        partial = " (first requests only: rates compared per request)" if n_hf < len(items) else ""
        print(
            f"transformers: {n_hf / hf_s:8.2f} requests/s  {hf_generated / hf_s:10.1f} generated tokens/s  "
            f"({n_hf} requests in {hf_s:.1f} s, batch {batch}, padded){partial}"
        )
        same = [common_prefix(a, b) for a, b in zip(ours_tokens, hf_tokens)]
        print(
            f"  ratio at batch {batch}: {ours_rate / (n_hf / hf_s):.2f}x; greedy tokens agreeing before the "
            f"first difference: {sum(same) / len(same):.1f} of {args.new_tokens} on average "
            f"({sum(s == args.new_tokens for s in same)}/{len(same)} identical)"
        )
        best = max(best, n_hf / hf_s)
    if best:
        print(
            f"ratio (engine {best_variant} / best transformers batch, requests/s): {ours_rate / best:.2f}x"
        )


if __name__ == "__main__":
    main()
