"""The batched engine: scheduler and cache units, then whole batches against the simple `generate`."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model import Qwen2VL, generate, scratch
from model.engine import Engine, EngineConfig, Request, model_runner
from model.engine.attention.triton_decode import (
    decode_attention_reference,
    kernel_problem,
    paged_decode_attention,
)
from model.engine.block_manager import BlockManager
from model.engine.cuda_graphs import padded_batch_sizes
from model.engine.model_runner import plan_vision_calls, split_vision_item
from model.engine.sampling import SamplingParams, filter_top_k_top_p, sample
from model.engine.scheduler import Scheduler
from model.engine.sequence import Sequence, SequenceStatus, VisionItem
from model.processor import Processor

NEW_TOKENS = 10


# --- units --------------------------------------------------------------------------------------------------


def text_sequence(index: int, prompt_len: int) -> Sequence:
    return Sequence(
        index, None, list(range(prompt_len)), prompt_len, torch.zeros(3, prompt_len, dtype=torch.long), 0
    )


def test_block_manager_grows_frees_and_maps_slots():
    bm = BlockManager(num_blocks=5, block_size=4)
    table: list[int] = []
    bm.grow(table, 9)  # 9 tokens -> 3 blocks
    assert len(table) == 3 and bm.num_free == 2
    assert bm.slots(table, 3, 6) == [table[0] * 4 + 3, table[1] * 4, table[1] * 4 + 1]
    assert not bm.can_grow(table, 21) and bm.can_grow(table, 20)
    bm.free(table)
    assert table == [] and bm.num_free == 5


def test_scheduler_chunks_prefill_under_token_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_batch_tokens=10)
    long, short = text_sequence(0, 23), text_sequence(1, 5)
    sched.add(long)
    sched.add(short)
    sizes = []
    while long.num_computed < long.prompt_len:
        batch = sched.schedule()
        assert batch.num_tokens <= 10
        sizes.append(dict(zip([s.index for s in batch.seqs], batch.num_new_tokens)))
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed += n
    # The long prompt takes the whole first budget; the short one joins once room is left.
    assert sizes[0] == {0: 10}
    assert sizes[1] == {0: 10}
    assert sizes[2] == {0: 3, 1: 5}


def test_scheduler_respects_max_num_seqs_and_preempts_youngest():
    bm = BlockManager(num_blocks=3, block_size=4)
    sched = Scheduler(bm, max_num_seqs=2, max_batch_tokens=100)
    seqs = [text_sequence(i, 4) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert [s.index for s in batch.seqs] == [0, 1]  # max_num_seqs keeps the third waiting
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed += n
        seq.token_ids.append(7)  # a sampled token: each now needs a second block, one is free
    batch = sched.schedule()
    assert batch.seqs == [seqs[0]] and batch.preempted == [seqs[1]]
    assert seqs[1].status is SequenceStatus.WAITING and seqs[1].num_computed == 0 and not seqs[1].block_table
    assert list(sched.waiting) == [seqs[1], seqs[2]]  # the preempted one goes first in line
    assert bm.num_free == 1


def test_top_k_top_p_filter_matches_definition():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    top_k = torch.tensor([0, 1, 5, 0, 3, 50])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.9, 0.2])
    out = filter_top_k_top_p(logits, top_k, top_p)
    for row in range(6):
        order = logits[row].argsort(descending=True)
        k = int(top_k[row]) or 50
        kept = order[:k]
        probs = logits[row][kept].softmax(-1)
        above = probs.cumsum(-1) - probs
        kept = kept[above < float(top_p[row])]
        assert set(torch.isfinite(out[row]).nonzero().squeeze(1).tolist()) == set(kept.tolist())


def test_seeded_draws_ignore_batch_neighbours():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 1000, generator=gen)
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    other = SamplingParams(temperature=0.7)
    alone = sample(logits[2:3], [seeded], [5])
    batched = sample(logits, [other, SamplingParams(), seeded, other], [0, 0, 5, 3])
    assert int(batched[2]) == int(alone[0])
    draws = {int(sample(logits[2:3], [seeded], [step])[0]) for step in range(20)}
    assert len(draws) > 1  # the step feeds the generator: not the same token every time


def test_video_split_and_vision_call_plan():
    video = VisionItem(torch.arange(5 * 4 * 6 * 2).float().view(5 * 4 * 6, 2), (5, 4, 6), True)
    pieces = split_vision_item(video, max_patches=50)
    assert [p.grid_thw for p in pieces] == [(2, 4, 6), (2, 4, 6), (1, 4, 6)]
    assert torch.equal(torch.cat([p.pixel_values for p in pieces]), video.pixel_values)
    image = VisionItem(torch.zeros(64, 2), (1, 8, 8), False)
    assert split_vision_item(image, max_patches=10) == [image]
    calls = plan_vision_calls([30, 10, 64, 10, 20], max_patches=40)
    assert sorted(i for c in calls for i in c) == [0, 1, 2, 3, 4]
    assert all(sum([30, 10, 64, 10, 20][i] for i in c) <= 40 or len(c) == 1 for c in calls)


# --- whole batches against the simple generate ------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tiny_checkpoint):
    model = Qwen2VL.from_pretrained(tiny_checkpoint)
    processor = Processor.from_pretrained(tiny_checkpoint)
    return model, processor


def test_cpu_buffer_paths_change_no_value(setup, monkeypatch):
    """Row-chunked MLPs and the LM head's vocab slices (model/scratch.py, ModelRunner.logits) give the
    numbers of one whole matmul to float32 round-off. Not bit for bit: MKL picks its kernels by shape and by
    CPU, and on AVX-512/AMX machines a 4-row chunk rounds differently from 300 rows (errors near 1e-6)."""
    model, _ = setup
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, model.config.hidden_size, generator=gen)
    patches = torch.randn(300, model.config.vision.embed_dim, generator=gen)
    mlp, vision_mlp = model.model.layers[0].mlp, model.visual.blocks[0].mlp
    runner = Engine(model, EngineConfig(num_kv_blocks=4)).runner
    with torch.inference_mode():
        whole = mlp(x), vision_mlp(patches)
        # 7 rows' worth: chunks of 4 rows then (a tail of 7 rows would round differently)
        monkeypatch.setattr(scratch, "CHUNK_BYTES", 7 * 4 * max(mlp.gate_proj.out_features, 128))
        assert_round_off(mlp(x), whole[0])
        assert_round_off(vision_mlp(patches), whole[1])
        monkeypatch.setattr(model_runner, "LM_HEAD_SLICE", 1024)  # the vocab ends in a shorter slice
        for rows in (x[:32], x[40:52], x[60:65]):  # the slices, the buffer reused for fewer, the plain head
            assert_round_off(runner.logits(rows), model.logits(rows))


def assert_round_off(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 round-off of a reordered sum: a few ulps of the largest values, never more."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * max(scale, 1.0))


def mixed_messages() -> list[list[dict]]:
    """18 conversations: images of many sizes, two-image prompts, videos, an image + video, text only."""
    rng = np.random.default_rng(0)

    def image(h, w):
        return {"type": "image", "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8)}

    def video(t, h, w):
        return {"type": "video", "video": rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)}

    def text(s):
        return {"type": "text", "text": s}

    contents = [
        [image(56, 56), text("What is this?")],
        [image(84, 140), text("Describe the picture.")],
        [image(140, 84), text("Read the text.")],
        [image(112, 112), text("Caption it.")],
        [image(56, 224), text("A wide one.")],
        [image(200, 60), text("A tall one.")],
        [image(168, 168)],
        [image(56, 84), image(84, 56), text("Compare the two images.")],
        [text("First:"), image(112, 56), text("second:"), image(56, 112)],
        [video(4, 56, 56), text("What happens in the video?")],
        [video(6, 84, 56), text("Summarise.")],
        [video(2, 112, 84)],
        [image(56, 56), video(4, 56, 84), text("Does the picture appear in the clip?")],
        [video(4, 56, 56), text("and"), image(84, 84)],
        [text("Hello!")],
        [text("Write a haiku about paged attention and continuous batching.")],
        [text("x " * 60)],
        [text("Which is larger, 9.11 or 9.9?")],
    ]
    return [[{"role": "user", "content": c}] for c in contents]


@pytest.fixture(scope="module")
def workload(setup):
    """Processor inputs of the mixed conversations and each one's greedy tokens from `generate`, run alone."""
    model, processor = setup
    inputs = [processor(m) for m in mixed_messages()]
    kinds = {
        ("image" if i["pixel_values"] is not None else "")
        + ("video" if i["pixel_values_videos"] is not None else "")
        for i in inputs
    }
    assert kinds == {"image", "video", "imagevideo", ""}
    reference = [generate(model, i, max_new_tokens=NEW_TOKENS, stop_token_ids=[])[0] for i in inputs]
    return inputs, reference


def greedy_requests(inputs) -> list[Request]:
    return [
        Request.from_inputs(i, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5))
        for i in inputs
    ]


def reference_top5(model: Qwen2VL, inputs: dict, generated: list[int]) -> dict[int, float]:
    """Log-probabilities of the 5 likeliest tokens after prompt + `generated`, from a full forward pass."""
    ids = torch.cat([torch.as_tensor(inputs["input_ids"]).reshape(1, -1), torch.tensor([generated])], dim=1)
    vision = {
        k: inputs[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
    }
    with torch.inference_mode():
        logp = model(input_ids=ids, **vision)[0, -1].float().log_softmax(-1)
    values, tokens = logp.topk(5)
    return dict(zip(tokens.tolist(), values.tolist()))


def assert_same_greedy(model, inputs, ref: list[int], out, atol: float = 1e-3) -> None:
    """Token lists must be equal, except that they may part at a near-tie: each run's token is in the
    other's top 5 with a log-probability within `atol` of the token that run chose (vLLM's rule)."""
    assert out.finish_reason == "length" and len(out.token_ids) == len(ref), out
    for step, (a, b) in enumerate(zip(ref, out.token_ids)):
        if a == b:
            continue
        ref_top = reference_top5(model, inputs, ref[:step])
        ours = out.logprobs[step]
        near_tie = (
            b in ref_top
            and a in ours
            and abs(ref_top[b] - ref_top[a]) <= atol
            and abs(ours[a] - ours[b]) <= atol
        )
        assert near_tie, (
            f"step {step}: generate chose {a}, the engine {b}; not a near-tie ({ref_top} vs {ours})"
        )
        return


ENGINE_CONFIGS = {
    # everything fits: one packed prefill, then decodes
    "roomy": EngineConfig(max_batch_tokens=4096, num_kv_blocks=512),
    # budget far below the prompts: chunked prefill; vision calls split videos into temporal slices
    "chunked": EngineConfig(max_batch_tokens=24, num_kv_blocks=512, max_vision_patches=48),
    # room for ~2 requests: the rest wait for blocks, and decodes that outgrow the cache preempt
    "small_cache": EngineConfig(max_batch_tokens=256, num_kv_blocks=14, block_size=8),
}


@pytest.mark.parametrize("name", list(ENGINE_CONFIGS))
def test_batch_matches_generate_alone(setup, workload, name):
    model, processor = setup
    inputs, reference = workload
    engine = Engine(model, ENGINE_CONFIGS[name], tokenizer=processor.tokenizer)
    outputs = engine.generate(greedy_requests(inputs))
    assert [o.index for o in outputs] == list(range(len(inputs)))
    for i, (ref, out) in enumerate(zip(reference, outputs)):
        assert out.num_prompt_tokens == torch.as_tensor(inputs[i]["input_ids"]).numel()
        assert out.num_generated_tokens == NEW_TOKENS
        assert out.text == processor.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert_same_greedy(model, inputs[i], ref, out)
    visual = [o.num_visual_tokens for o in outputs]
    assert visual[-4:] == [0, 0, 0, 0] and min(visual[:14]) > 0
    stats = engine.stats
    if name == "chunked":
        assert stats.steps > stats.prefill_tokens / 24  # prompts were cut into chunks
    if name == "small_cache":
        # Requests queued while others held the cache: some started only after another had finished.
        first_done = min(o.timings["total_s"] for o in outputs)
        assert max(o.timings["queued_s"] for o in outputs) > first_done
        assert stats.preemptions > 0


def test_bad_requests_fail_alone(setup, workload):
    model, processor = setup
    inputs, reference = workload
    requests = greedy_requests(inputs[:3])
    too_long = Request(list(range(100, 400)), sampling=SamplingParams(max_new_tokens=4))
    image = inputs[0]
    doubled = torch.cat([image["pixel_values"]] * 2)
    wrong_grid = Request(image["input_ids"][0].tolist(), doubled, torch.tensor([[1, 4, 8]]))
    wrong_pixels = Request(
        image["input_ids"][0].tolist(), image["pixel_values"][:, :100], image["image_grid_thw"]
    )
    missing_pixels = Request(image["input_ids"][0].tolist())
    engine = Engine(model, EngineConfig(max_model_len=256, num_kv_blocks=256), tokenizer=processor.tokenizer)
    outputs = engine.generate(
        [requests[0], too_long, requests[1], wrong_grid, wrong_pixels, missing_pixels, requests[2]]
    )
    errors = [o for o in outputs if o.finish_reason == "error"]
    assert [o.index for o in errors] == [1, 3, 4, 5]
    assert "max_model_len=256" in outputs[1].error
    assert "pad tokens" in outputs[3].error
    assert "pixel values of shape" in outputs[4].error
    assert "no image inputs" in outputs[5].error
    for out, ref, inp in zip([outputs[0], outputs[2], outputs[6]], reference[:3], inputs[:3]):
        assert_same_greedy(model, inp, ref, out)


def test_seeded_sampling_is_batch_independent(setup, workload):
    model, processor = setup
    inputs, _ = workload
    params = [SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=s) for s in (7, 8)]
    targets = [Request.from_inputs(inputs[1], params[0]), Request.from_inputs(inputs[9], params[1])]
    crowd = [Request.from_inputs(i, SamplingParams(max_new_tokens=5, temperature=1.0)) for i in inputs[2:8]]
    engine = Engine(
        model, EngineConfig(max_batch_tokens=64, num_kv_blocks=512), tokenizer=processor.tokenizer
    )
    alone = [engine.generate([r])[0].token_ids for r in targets]
    mixed = engine.generate([crowd[0], targets[0], *crowd[1:4], targets[1], *crowd[4:]])
    assert mixed[1].token_ids == alone[0]
    assert mixed[5].token_ids == alone[1]
    greedy = engine.generate([Request.from_inputs(inputs[1], SamplingParams(max_new_tokens=8))])[0]
    assert greedy.token_ids != alone[0]  # it did sample


def test_stop_tokens_strings_and_max_model_len(setup, workload):
    model, processor = setup
    inputs, reference = workload
    tok = processor.tokenizer
    engine = Engine(model, EngineConfig(num_kv_blocks=256), tokenizer=tok)
    ref = reference[14]
    prompt = inputs[14]
    stop_at = next(i for i in range(2, NEW_TOKENS) if ref[i] not in ref[:i])
    by_token = Request.from_inputs(
        prompt, SamplingParams(max_new_tokens=NEW_TOKENS, stop_token_ids=(ref[stop_at],))
    )
    full_text = tok.decode(ref, skip_special_tokens=True)
    stop_text = tok.decode(ref[stop_at : stop_at + 1], skip_special_tokens=True)
    by_string = Request.from_inputs(prompt, SamplingParams(max_new_tokens=NEW_TOKENS, stop=(stop_text,)))
    outputs = engine.generate([by_token, by_string])
    assert outputs[0].finish_reason == "stop" and outputs[0].token_ids == ref[: stop_at + 1]
    assert outputs[1].finish_reason == "stop"
    assert outputs[1].text == full_text[: full_text.find(stop_text)]
    prompt_len = torch.as_tensor(prompt["input_ids"]).numel()
    capped = Engine(model, EngineConfig(max_model_len=prompt_len + 3, num_kv_blocks=64), tokenizer=tok)
    out = capped.generate([Request.from_inputs(prompt, SamplingParams(max_new_tokens=NEW_TOKENS))])[0]
    assert out.finish_reason == "length" and out.token_ids == ref[:3]


def test_stop_strings_need_a_tokenizer(setup, workload):
    model, _ = setup
    inputs, _ = workload
    engine = Engine(model, EngineConfig(num_kv_blocks=64))
    out = engine.generate([Request.from_inputs(inputs[14], SamplingParams(stop=("x",)))])[0]
    assert out.finish_reason == "error" and "tokenizer" in out.error


def test_failed_step_leaves_engine_usable(setup, workload, monkeypatch):
    model, processor = setup
    inputs, reference = workload
    engine = Engine(model, EngineConfig(num_kv_blocks=64), tokenizer=processor.tokenizer)
    run = engine.runner.run

    def broken(batch):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(engine.runner, "run", broken)
    with pytest.raises(RuntimeError, match="device fell over"):
        engine.generate(greedy_requests(inputs[:2]))
    assert engine.blocks.num_free == 64 and not engine.scheduler.has_unfinished
    monkeypatch.setattr(engine.runner, "run", run)
    out = engine.generate(greedy_requests(inputs[:1]))[0]
    assert_same_greedy(model, inputs[0], reference[0], out)


# --- the Triton decode kernel and graphed decode steps (Triton's interpreter on the CPU, see conftest) ----


@pytest.mark.parametrize(
    "heads,kv_heads,dim,block_size,dtype",
    [
        (4, 2, 16, 16, torch.float32),  # GQA groups of 2, 6, 1, 7; head dims padded to a power of two
        (12, 2, 80, 16, torch.float32),
        (6, 6, 32, 8, torch.float32),
        (14, 2, 64, 256, torch.float32),
        (12, 2, 128, 16, torch.bfloat16),  # Qwen2-VL-2B's geometry, in the GPU's dtype
    ],
)
def test_paged_decode_kernel_matches_softmax(heads, kv_heads, dim, block_size, dtype):
    gen = torch.Generator().manual_seed(heads * dim)
    num_blocks = 48
    shape = (3, num_blocks, block_size, kv_heads, dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    lens = torch.tensor([1, 17, 130, 64, 5], dtype=torch.int32)  # one token, and across blocks and tiles
    width = max(-(-n // block_size) for n in lens.tolist())
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in lens]).int()
    q = torch.randn(len(lens), heads, dim, generator=gen).to(dtype)
    out = paged_decode_attention(q, k_cache[1], v_cache[1], tables, lens)  # a layer's slice, as the engine
    assert out.shape == q.shape and out.dtype == dtype
    expected = decode_attention_reference(q, k_cache[1], v_cache[1], tables, lens)
    if dtype == torch.float32:  # float32 sums in another order
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    else:  # the output rounded to bf16
        torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)
    assert kernel_problem(torch.device("cpu"), dtype) is None  # the engine's start-up check


def test_graph_batch_sizes_cover_every_batch():
    assert padded_batch_sizes(256) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256]
    assert padded_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    for cap in (1, 3, 100, 300):
        sizes = padded_batch_sizes(cap)
        assert sizes[-1] == cap and sizes == sorted(set(sizes))
        assert all(b - a <= (16 if a < 128 else 32) for a, b in zip(sizes, sizes[1:]) if a >= 16)


@pytest.mark.parametrize("name", ["roomy", "small_cache"])
def test_triton_decode_and_graph_steps_match_generate(setup, workload, name):
    """Decodes through the Triton kernel, decode-only steps on the graphs' static buffers (padded batch rows
    writing to the sink block), run eagerly: still each request's tokens from generate run alone."""
    model, processor = setup
    inputs, reference = workload
    config = dataclasses.replace(ENGINE_CONFIGS[name], attention_backend="triton")
    engine = Engine(model, config, tokenizer=processor.tokenizer)
    engine.runner.use_decode_graphs(config.max_num_seqs, engine.max_model_len, capture=False)
    outputs = engine.generate(greedy_requests(inputs))
    for i, (ref, out) in enumerate(zip(reference, outputs)):
        assert_same_greedy(model, inputs[i], ref, out)
    stats = engine.stats
    assert 0 < stats.graph_steps <= stats.decode_only_steps  # some decode-only steps took the static path
    if name == "small_cache":
        assert stats.preemptions > 0  # recomputed sequences came back to graphed decoding
    assert engine.blocks.num_free == engine.blocks.num_blocks  # the sink block was never handed out


def test_attention_backend_must_run_here(setup):
    model, _ = setup
    with pytest.raises(ValueError, match="attention_backend='flash'.*flash_attn"):
        Engine(model, EngineConfig(num_kv_blocks=4, attention_backend="flash"))
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        Engine(model, EngineConfig(num_kv_blocks=4, attention_backend="xformers"))
    assert Engine(model, EngineConfig(num_kv_blocks=4)).runner.backend == "sdpa"  # the CPU's default
    with pytest.raises(ValueError, match="triton attention backend"):
        Engine(model, EngineConfig(num_kv_blocks=4)).runner.use_decode_graphs(4, 64, capture=False)


def test_requests_added_while_others_decode_join_their_steps(setup, workload, monkeypatch):
    """The incremental interface: a request added mid-run is prefilled beside running decodes, an aborted
    one frees its blocks, a refused one comes back from step(); every output equals generate() alone."""
    model, processor = setup
    inputs, reference = workload
    engine = Engine(model, ENGINE_CONFIGS["roomy"], tokenizer=processor.tokenizer)
    free_at_start = engine.blocks.num_free
    steps: list[set[int]] = []
    schedule = engine.scheduler.schedule

    def logged():
        batch = schedule()
        steps.append({s.index for s in batch.seqs})
        return batch

    monkeypatch.setattr(engine.scheduler, "schedule", logged)
    requests = greedy_requests(inputs)
    first = {engine.add_request(r): i for i, r in enumerate(requests[:6])}
    outputs = {}
    while len(steps) < 3:  # the first requests are decoding now
        outputs.update({o.index: o for o in engine.step()})
    second = {engine.add_request(r): i for i, r in enumerate(requests[6:], start=6)}
    refused = engine.add_request(Request([]))
    doomed = engine.add_request(requests[0])
    outputs.update({o.index: o for o in engine.step()})
    engine.abort(doomed)
    while engine.has_unfinished:
        outputs.update({o.index: o for o in engine.step()})
    assert any(step & set(first) and step & set(second) for step in steps)  # the two groups share steps
    assert outputs.pop(refused).finish_reason == "error" and doomed not in outputs
    assert set(outputs) == set(first) | set(second)
    for rid, i in {**first, **second}.items():
        assert_same_greedy(model, inputs[i], reference[i], outputs[rid])
    assert engine.blocks.num_free == free_at_start and not engine.has_unfinished
