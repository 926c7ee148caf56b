"""Batched Qwen2-VL engine: many multimodal requests in, texts out, with continuous batching.

Each step the scheduler picks decodes and prefill chunks under a token budget, the runner encodes the
images/videos of prompts entering prefill (batched across requests), runs the packed language model over
the paged KV cache and returns the logits of sequences due a token; the engine samples, checks stop
conditions and retires finished requests, whose blocks admit the next ones.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.kv_cache import BlockManager, CacheShape, blocks_needed
from model.model_runner import ModelRunner
from model.paged_attention import backend_problem, pick_backend
from model.qwen2vl import Qwen2VL
from model.rope import mrope_positions
from model.sampling import SamplingParams, sample, top_logprobs
from model.scheduler import ScheduledBatch, Scheduler
from model.sequence import Sequence, VisionItem
from model.triton_attention import kernel_problem


@dataclass
class EngineConfig:
    """Batch and memory limits of the engine. The KV cache size comes from, in order: `num_kv_blocks`,
    `kv_cache_bytes`, `kv_cache_fraction` of free GPU memory; by default 80% of free GPU memory on CUDA and
    512 MiB on CPU, never more than max_num_seqs x max_model_len tokens."""

    max_batch_tokens: int = 8192  # tokens computed per step (prefill chunks + decodes)
    max_num_seqs: int = 256  # sequences holding KV cache at once
    max_model_len: int | None = None  # prompt + generated tokens; default: the model's max positions
    max_vision_patches: int = 16384  # patches per vision-tower call
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float | None = None
    num_kv_blocks: int | None = None
    # tokens per KV block; by default 256 with flash-attn (what its paged mode takes), else 16
    block_size: int | None = None
    seed: int = 0  # draws of requests without their own seed
    # "flash", "triton" or "sdpa"; by default flash-attn where installed, else the Triton decode kernel on
    # CUDA (after a check against a reference), else SDPA
    attention_backend: str | None = None
    # decode-only steps replayed as CUDA graphs (CUDA with the triton backend); if capture fails, eager
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_num_seqs", "max_vision_patches"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_fraction is not None and not 0 < self.kv_cache_fraction < 1:
            raise ValueError(
                f"EngineConfig.kv_cache_fraction must be in (0, 1), got {self.kv_cache_fraction}"
            )


@dataclass
class Request:
    """A prompt's token ids, the processor's vision inputs for it (batch dim 1 allowed) and how to sample."""

    prompt_token_ids: Seq[int] | torch.Tensor
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)

    @classmethod
    def from_inputs(cls, inputs: dict, sampling: SamplingParams | None = None) -> Request:
        """From the dict `Processor.__call__` returns (input_ids (1, S), pixel_values, grids, ...)."""
        return cls(
            prompt_token_ids=torch.as_tensor(inputs["input_ids"]).reshape(-1).tolist(),
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            pixel_values_videos=inputs.get("pixel_values_videos"),
            video_grid_thw=inputs.get("video_grid_thw"),
            sampling=sampling or SamplingParams(),
        )


@dataclass
class RequestOutput:
    """What became of one request. finish_reason: 'stop', 'length' or 'error' (then `error` says why)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    error: str | None
    num_prompt_tokens: int
    num_visual_tokens: int
    num_generated_tokens: int
    # seconds from the generate() call: queued_s until first scheduled, first_token_s, total_s until finished
    timings: dict[str, float]
    num_preemptions: int = 0
    logprobs: list[dict[int, float]] | None = None


@dataclass
class EngineStats:
    """Counters of the last generate() call."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    vision_seconds: float = 0.0
    vision_patches: int = 0
    decode_only_steps: int = 0  # steps with no prefill token, and their wall time
    decode_only_seconds: float = 0.0
    graph_steps: int = 0  # decode-only steps run as CUDA graphs (or their static-buffer stand-in)
    wall_seconds: float = 0.0


class Engine:
    """Continuous-batching generation over a loaded `Qwen2VL`. `tokenizer` (anything with
    `decode(ids, skip_special_tokens=True)`) gives output text and enables stop strings."""

    def __init__(
        self,
        model: Qwen2VL,
        config: EngineConfig | None = None,
        tokenizer=None,
        eos_token_ids: Seq[int] | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.config = config = config or EngineConfig()
        self.model_config = model.config
        self.device = model.device
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.eos_token_ids = set(eos_token_ids or [self.model_config.eos_token_id])
        backend = self._pick_backend()
        block_size = config.block_size or (256 if backend == "flash" else 16)
        if backend == "flash" and block_size % 256:
            raise ValueError(
                f"EngineConfig.block_size={block_size}: flash-attn's paged KV needs a multiple of 256"
            )
        num_blocks = self._num_blocks(block_size)
        self.runner = ModelRunner(model, num_blocks, block_size, config.max_vision_patches, backend)
        if config.cuda_graphs and backend == "triton" and self.device.type == "cuda":
            try:
                self.runner.use_decode_graphs(config.max_num_seqs, self.max_model_len, capture=True)
            except Exception as e:  # slower, still right: say so and run eagerly
                message = f"CUDA graphs for decode steps failed ({e}); decode steps run eagerly"
                warnings.warn(message, stacklevel=2)
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_batch_tokens)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.stats = EngineStats()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: EngineConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Engine:
        """Load the checkpoint, its tokenizer.json and its generation_config.json end-of-sequence ids."""
        from model.tokenizer import Tokenizer

        path = Path(path)
        model = Qwen2VL.from_pretrained(path, dtype=dtype, device=device)
        tokenizer = (
            Tokenizer.from_file(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
        )
        eos = None
        gen_config = path / "generation_config.json"
        if gen_config.is_file():
            value = json.loads(gen_config.read_text()).get("eos_token_id")
            eos = [value] if isinstance(value, int) else value
        return cls(model, config, tokenizer, eos)

    def _pick_backend(self) -> str:
        dtype, wanted = self.model.dtype, self.config.attention_backend
        if wanted is not None:
            problem = backend_problem(wanted, self.device, dtype)
            if problem:
                raise ValueError(f"EngineConfig.attention_backend={wanted!r}: {problem}")
            return wanted
        backend = pick_backend(self.device, dtype)
        if backend == "triton":
            problem = kernel_problem(self.device, dtype)
            if problem:
                message = f"the Triton decode kernel failed its check ({problem}); using SDPA"
                warnings.warn(message, stacklevel=2)
                return "sdpa"
        return backend

    def _num_blocks(self, block_size: int) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        c = self.model_config
        shape = CacheShape(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, block_size)
        shape_bytes = shape.bytes_per_block(self.model.dtype)
        cap = blocks_needed(cfg.max_num_seqs * self.max_model_len, block_size)
        if cfg.kv_cache_bytes is not None:
            num = cfg.kv_cache_bytes // shape_bytes
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            num = int(free * (cfg.kv_cache_fraction or 0.8)) // shape_bytes
        else:
            num = (512 << 20) // shape_bytes
        num = min(num, cap)
        if num < 1:
            raise ValueError(
                f"the KV cache budget holds no block of {block_size} tokens ({shape_bytes} bytes); "
                "raise EngineConfig.kv_cache_bytes or kv_cache_fraction"
            )
        return num

    # --- requests -------------------------------------------------------------------------------------------

    def _make_sequence(self, index: int, req: Request) -> Sequence:
        """Validate a request and build its sequence; a ValueError says what is wrong with it."""
        c = self.model_config
        ids = torch.as_tensor(req.prompt_token_ids).reshape(-1).tolist()
        if not ids:
            raise ValueError("empty prompt: give at least one token id")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens leaves no room to generate under "
                f"max_model_len={self.max_model_len}; "
                "use fewer frames or smaller images, or raise EngineConfig.max_model_len"
            )
        if req.sampling.stop and self.tokenizer is None:
            raise ValueError(
                "stop strings need a tokenizer: pass tokenizer= to Engine or use Engine.from_pretrained"
            )
        if min(ids) < 0 or max(ids) >= c.vocab_size:
            raise ValueError(
                f"prompt token ids must lie in [0, {c.vocab_size}); tokenize with the model's tokenizer"
            )
        items: list[VisionItem] = []
        grids = {}
        for kind, pixels, grid, pad in (
            ("image", req.pixel_values, req.image_grid_thw, c.image_token_id),
            ("video", req.pixel_values_videos, req.video_grid_thw, c.video_token_id),
        ):
            grids[kind] = None
            num_pads = ids.count(pad)
            if pixels is None and grid is None:
                if num_pads:
                    raise ValueError(
                        f"the prompt has {num_pads} {kind} pad tokens but no {kind} inputs were given"
                    )
                continue
            if pixels is None or grid is None:
                raise ValueError(
                    f"{kind} inputs need both pixel values and grid_thw (the processor gives both)"
                )
            grid = torch.as_tensor(grid).reshape(-1, 3).long()
            items.extend(self._vision_items(kind, pixels, grid, num_pads))
            grids[kind] = grid
        positions, delta = mrope_positions(ids, grids["image"], grids["video"], c)
        longest = min(len(ids) + req.sampling.max_new_tokens, self.max_model_len)
        if blocks_needed(longest, self.blocks.block_size) > self.blocks.num_blocks:
            raise ValueError(
                f"a request of up to {longest} tokens needs {blocks_needed(longest, self.blocks.block_size)} "
                f"KV blocks but the cache has {self.blocks.num_blocks}; raise the KV cache size or lower "
                "max_new_tokens"
            )
        num_visual = sum(it.num_patches for it in items) // c.vision.spatial_merge_size**2
        return Sequence(index, req, ids, len(ids), positions, delta, items, num_visual)

    def _vision_items(
        self, kind: str, pixels: torch.Tensor, grid: torch.Tensor, num_pads: int
    ) -> list[VisionItem]:
        v = self.model_config.vision
        m = v.spatial_merge_size
        if bool((grid <= 0).any()) or bool((grid[:, 1:] % m).any()):
            raise ValueError(
                f"{kind}_grid_thw {grid.tolist()} is invalid: all positive, height and width "
                f"multiples of {m}; use the processor's grid"
            )
        sizes = grid.prod(-1).tolist()
        pixels = torch.as_tensor(pixels)
        if pixels.dim() == 3 and pixels.shape[0] == 1:
            pixels = pixels[0]
        if tuple(pixels.shape) != (sum(sizes), v.patch_dim):
            raise ValueError(
                f"{kind} pixel values of shape {tuple(pixels.shape)} do not match grid_thw "
                f"{grid.tolist()}, which needs ({sum(sizes)}, {v.patch_dim}); pass the processor's output"
            )
        if sum(sizes) // m**2 != num_pads:
            raise ValueError(
                f"the prompt has {num_pads} {kind} pad tokens but {kind}_grid_thw {grid.tolist()} "
                f"gives {sum(sizes) // m**2} tokens; build the prompt with the processor"
            )
        return [VisionItem(p, tuple(g), kind == "video") for p, g in zip(pixels.split(sizes), grid.tolist())]

    # --- the loop -------------------------------------------------------------------------------------------

    def generate(
        self, requests: Seq[Request], progress: Callable[[RequestOutput], None] | None = None
    ) -> list[RequestOutput]:
        """Run all requests to completion; outputs come back in request order. `progress` is called with
        each output as its request finishes."""
        start = time.perf_counter()
        self.stats = EngineStats()
        vision_before = self.runner.vision_seconds, self.runner.vision_patches
        graph_steps_before = self.runner.decode_graphs.steps if self.runner.decode_graphs else 0
        outputs: list[RequestOutput | None] = [None] * len(requests)
        for i, req in enumerate(requests):
            try:
                seq = self._make_sequence(i, req)
            except ValueError as e:
                outputs[i] = _error_output(i, req, str(e))
                if progress:
                    progress(outputs[i])
                continue
            seq.timings.arrival = start
            self.scheduler.add(seq)
        idle_steps = 0
        try:
            while self.scheduler.has_unfinished:
                steps_before = self.stats.steps
                for seq in self.step():
                    outputs[seq.index] = self._output(seq)
                    if progress:
                        progress(outputs[seq.index])
                idle_steps = idle_steps + 1 if self.stats.steps == steps_before else 0
                if idle_steps > 2:
                    raise RuntimeError("engine made no progress: the scheduler found nothing to run")
        except BaseException:
            self.scheduler.abort_all()  # leave the engine usable for the next call
            raise
        self.stats.wall_seconds = time.perf_counter() - start
        self.stats.vision_seconds = self.runner.vision_seconds - vision_before[0]
        self.stats.vision_patches = self.runner.vision_patches - vision_before[1]
        if self.runner.decode_graphs:
            self.stats.graph_steps = self.runner.decode_graphs.steps - graph_steps_before
        return outputs

    def step(self) -> list[Sequence]:
        """Schedule and run one step; returns the sequences that finished in it."""
        batch = self.scheduler.schedule()
        self.stats.preemptions += len(batch.preempted)
        if not batch.seqs:
            return []
        now = time.perf_counter()
        prefill_tokens = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.timings.first_scheduled is None:
                seq.timings.first_scheduled = now
            if n > 1 or seq.num_computed < seq.prompt_len:
                prefill_tokens += n
        self.stats.prefill_tokens += prefill_tokens
        self.stats.decode_tokens += batch.num_tokens - prefill_tokens
        finished = self._run(batch)
        if not prefill_tokens:  # the sampled tokens' .tolist() synchronised the device: the time is real
            self.stats.decode_only_steps += 1
            self.stats.decode_only_seconds += time.perf_counter() - now
        return finished

    def _run(self, batch: ScheduledBatch) -> list[Sequence]:
        to_sample, logits = self.runner.run(batch)
        self.stats.steps += 1
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed += n
            if seq.num_computed >= seq.prompt_len:
                seq.release_vision()
        if not to_sample:
            return []
        params = [s.request.sampling for s in to_sample]
        tokens = sample(logits, params, [s.num_output_tokens for s in to_sample], self.generator)
        want_logprobs = max(p.logprobs for p in params)
        logprobs = top_logprobs(logits, tokens, want_logprobs) if want_logprobs else None
        finished = []
        for row, (seq, token) in enumerate(zip(to_sample, tokens.tolist())):
            if seq.request.sampling.logprobs:
                seq.logprobs.append(logprobs[row])
            if self._append(seq, token):
                finished.append(seq)
        self.stats.generated_tokens += len(to_sample)
        return finished

    def _append(self, seq: Sequence, token: int) -> bool:
        """Add a sampled token and retire the sequence if it is done."""
        now = time.perf_counter()
        if seq.timings.first_token is None:
            seq.timings.first_token = now
        seq.token_ids.append(token)
        sp = seq.request.sampling
        reason, text = None, None
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_token_ids):
            reason = "stop"
        elif sp.stop:
            # Whole-output decode each step: outputs are short, and merged bytes may change the text's tail.
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in sp.stop) if i >= 0]
            if hits:
                text, reason = text[: min(hits)], "stop"
        if reason is None and (
            seq.num_output_tokens >= sp.max_new_tokens or seq.num_tokens >= self.max_model_len
        ):
            reason = "length"
        if reason is None:
            return False
        if text is None and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        seq.text = text or ""
        self.scheduler.finish(seq, reason)
        return True

    def _output(self, seq: Sequence) -> RequestOutput:
        t = seq.timings

        def since(x: float | None) -> float:
            return (x - t.arrival) if x is not None else float("nan")

        return RequestOutput(
            index=seq.index,
            text=seq.text,
            token_ids=seq.output_ids,
            finish_reason=seq.finish_reason,
            error=seq.error,
            num_prompt_tokens=seq.prompt_len,
            num_visual_tokens=seq.num_visual_tokens,
            num_generated_tokens=seq.num_output_tokens,
            timings={
                "queued_s": since(t.first_scheduled),
                "first_token_s": since(t.first_token),
                "total_s": since(t.finished),
            },
            num_preemptions=seq.num_preemptions,
            logprobs=seq.logprobs if seq.request.sampling.logprobs else None,
        )


def _error_output(index: int, req: Request, message: str) -> RequestOutput:
    num_prompt = len(torch.as_tensor(req.prompt_token_ids).reshape(-1))
    return RequestOutput(
        index=index,
        text="",
        token_ids=[],
        finish_reason="error",
        error=message,
        num_prompt_tokens=num_prompt,
        num_visual_tokens=0,
        num_generated_tokens=0,
        timings={"queued_s": 0.0, "first_token_s": float("nan"), "total_s": 0.0},
    )


__all__ = ["Engine", "EngineConfig", "EngineStats", "Request", "RequestOutput", "SamplingParams"]
