"""Batched Qwen2-VL engine: many multimodal requests in, texts out, with continuous batching.

Each step the scheduler picks decodes and prefill chunks under a token budget, the runner encodes the
images/videos of prompts entering prefill (batched across requests), runs the packed language model over
the paged KV cache and returns the logits of sequences due a token; the engine samples, checks stop
conditions and retires finished requests, whose blocks admit the next ones.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import Qwen2VLConfig, read_eos_token_ids
from model.engine.attention import pick_backend
from model.engine.attention.flash import BLOCK_SIZE as FLASH_BLOCK_SIZE
from model.engine.block_manager import BlockManager, blocks_needed
from model.engine.grammar import Grammars, advance
from model.engine.kv_cache import CacheShape, num_kv_blocks
from model.engine.model_runner import ModelRunner
from model.engine.ranks import Ranks
from model.engine.request import Request, RequestOutput
from model.engine.sampling import SamplingParams, sample, top_logprobs
from model.engine.scheduler import ScheduledBatch, Scheduler
from model.engine.sequence import Sequence
from model.parallel import SINGLE, check_layout
from model.qwen2vl import Qwen2VL


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
    # decode-only steps replayed as CUDA graphs (CUDA with the triton backend, one rank); if capture
    # fails, eager
    cuda_graphs: bool = True
    # ranks the language model is sharded over (model/parallel.py), one process each, started by
    # Engine.from_pretrained on cuda:0..N-1 (or all on the CPU)
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_num_seqs", "max_vision_patches", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_fraction is not None and not 0 < self.kv_cache_fraction < 1:
            raise ValueError(
                f"EngineConfig.kv_cache_fraction must be in (0, 1), got {self.kv_cache_fraction}"
            )


def attention_layout(config: EngineConfig, device: torch.device, dtype: torch.dtype) -> tuple[str, int]:
    """The attention backend and KV block size the config gives on this device."""
    backend = pick_backend(device, dtype, config.attention_backend)
    block_size = config.block_size or (FLASH_BLOCK_SIZE if backend == "flash" else 16)
    if backend == "flash" and block_size % FLASH_BLOCK_SIZE:
        raise ValueError(
            f"EngineConfig.block_size={block_size}: flash-attn's paged KV needs a multiple of "
            f"{FLASH_BLOCK_SIZE}"
        )
    return backend, block_size


def kv_budget(config: EngineConfig, max_model_len: int) -> dict:
    """What sizes the KV cache (kv_cache.num_kv_blocks's arguments), the same on every rank."""
    return dict(
        num_kv_blocks=config.num_kv_blocks,
        max_tokens=config.max_num_seqs * max_model_len,
        cache_bytes=config.kv_cache_bytes,
        fraction=config.kv_cache_fraction,
    )


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
    mask_seconds: float = 0.0  # filling constrained rows' token masks (beside the model's run)
    mask_wait_seconds: float = 0.0  # steps waiting for those masks after the model had run
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
        ranks: Ranks | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.config = config = config or EngineConfig()
        self.model_config = model.config
        if model.tp.size != config.tensor_parallel_size or (ranks is None) != (model.tp.size == 1):
            raise ValueError(
                f"EngineConfig.tensor_parallel_size={config.tensor_parallel_size}: a tensor-parallel engine "
                "starts its ranks itself; build it with Engine.from_pretrained(path, config)"
            )
        self.ranks = ranks
        self.device = model.device
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.eos_token_ids = set(eos_token_ids or [self.model_config.eos_token_id])
        backend, block_size = attention_layout(config, self.device, model.dtype)
        num_blocks = self._num_blocks(block_size)
        if ranks is not None:
            num_blocks = ranks.agree_min(num_blocks)  # every rank's cache holds the same blocks
        self.runner = ModelRunner(model, num_blocks, block_size, config.max_vision_patches, backend, ranks)
        if ranks is not None:
            ranks.started()
        if config.cuda_graphs and backend == "triton" and self.device.type == "cuda" and ranks is None:
            try:
                self.runner.use_decode_graphs(config.max_num_seqs, self.max_model_len, capture=True)
            except Exception as e:  # slower, still right: say so and run eagerly
                message = f"CUDA graphs for decode steps failed ({e}); decode steps run eagerly"
                warnings.warn(message, stacklevel=2)
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_batch_tokens)
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self.stats = EngineStats()
        self._next_id = 0
        self._live: dict[int, Sequence] = {}  # request id -> its sequence, until it finishes
        self._refused: list[RequestOutput] = []  # outputs of refused requests, for the next step()
        self._grammars: Grammars | None = None  # built at the first request with a JSON schema

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: EngineConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Engine:
        """Load the checkpoint, its tokenizer.json and its generation_config.json end-of-sequence ids. With
        `tensor_parallel_size` N > 1, starts ranks 1..N-1 (model/engine/ranks.py), each loading its own
        shard; on CPU the calling thread's torch threads are shared among the ranks."""
        from model.tokenizer import Tokenizer

        path = Path(path)
        config = config or EngineConfig()
        ranks = None
        if config.tensor_parallel_size > 1:
            ranks = cls._start_ranks(path, config, dtype, torch.device(device))
            device = ranks.device
        try:
            tp = ranks.tp if ranks else SINGLE
            model = Qwen2VL.from_pretrained(path, dtype=dtype, device=device, tp=tp)
            tokenizer = (
                Tokenizer.from_file(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None
            )
            return cls(model, config, tokenizer, read_eos_token_ids(path), ranks)
        except BaseException:
            if ranks is not None:
                ranks.close(abort=True)
            raise

    @staticmethod
    def _start_ranks(path: Path, config: EngineConfig, dtype: torch.dtype, device: torch.device) -> Ranks:
        model_config = Qwen2VLConfig.from_json(path)
        check_layout(model_config, config.tensor_parallel_size)
        backend, block_size = attention_layout(config, device, dtype)
        threads = None
        if device.type == "cpu":
            threads = max(1, torch.get_num_threads() // config.tensor_parallel_size)
            torch.set_num_threads(threads)
        settings = dict(
            backend=backend,
            block_size=block_size,
            max_vision_patches=config.max_vision_patches,
            threads=threads,
            kv=kv_budget(config, config.max_model_len or model_config.max_position_embeddings),
        )
        return Ranks.start(path, config.tensor_parallel_size, dtype, device, settings)

    def close(self) -> None:
        """Stop a tensor-parallel engine's ranks and leave their group (nothing to do for one rank)."""
        if self.ranks is not None:
            self.ranks.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _num_blocks(self, block_size: int) -> int:
        kv = kv_budget(self.config, self.max_model_len)
        if kv["num_kv_blocks"] is not None:
            return kv["num_kv_blocks"]
        return num_kv_blocks(
            CacheShape.for_model(self.model_config, block_size, self.model.tp),
            self.model.dtype,
            self.device,
            max_tokens=kv["max_tokens"],
            cache_bytes=kv["cache_bytes"],
            fraction=kv["fraction"],
        )

    # --- the loop -------------------------------------------------------------------------------------------

    def add_request(self, request: Request) -> int:
        """Queue a request and return its id; it is prefilled in the next steps (chunked, under the step's
        token budget) beside the decodes already running. A request the engine refuses comes back from the
        next step() as an output with finish_reason 'error'."""
        rid = self._next_id
        self._next_id += 1
        try:
            seq = Sequence.from_request(
                rid, request, self.model_config, self.max_model_len, self.blocks, self.tokenizer is not None
            )
            if request.sampling.json_schema is not None:
                seq.matcher = self.grammars().matcher(request.sampling.json_schema)
        except ValueError as e:
            self._refused.append(RequestOutput.failed(rid, request, str(e)))
            return rid
        seq.timings.arrival = time.perf_counter()
        self._live[rid] = seq
        self.scheduler.add(seq)
        return rid

    def grammars(self) -> Grammars:
        """The engine's constrained decoding; it needs the tokenizer.json the engine was given."""
        if self._grammars is None:
            backend = getattr(self.tokenizer, "backend", None)
            if backend is None:
                raise ValueError("a JSON schema needs a tokenizer.json: use Engine.from_pretrained")
            self._grammars = Grammars(backend.to_str(), self.model_config.vocab_size, self.eos_token_ids)
        return self._grammars

    @property
    def has_unfinished(self) -> bool:
        """Whether a request is still waiting, running, or has an output step() has not handed back yet."""
        return bool(self._refused) or self.scheduler.has_unfinished

    @property
    def waiting_request_ids(self) -> list[int]:
        """Requests queued but not admitted yet (their prefill has not started)."""
        return [seq.index for seq in self.scheduler.waiting]

    def abort(self, request_id: int) -> None:
        """Drop a request that has not finished; its KV blocks go back at once and no output follows."""
        seq = self._live.pop(request_id, None)
        if seq is not None:
            self.scheduler.finish(seq, "error", "aborted")

    def step(self) -> list[RequestOutput]:
        """Schedule and run one step; returns the outputs of the requests that finished in it."""
        outputs, self._refused = self._refused, []
        for seq in self._step():
            self._live.pop(seq.index, None)
            outputs.append(seq.output())
        return outputs

    def generate(
        self, requests: Seq[Request], progress: Callable[[RequestOutput], None] | None = None
    ) -> list[RequestOutput]:
        """Run all requests to completion (a loop over add_request and step); outputs come back in request
        order, their index the position in `requests`. `progress` is called with each as it finishes."""
        start = time.perf_counter()
        self.stats = EngineStats()
        vision_before = self.runner.vision_seconds, self.runner.vision_patches
        graph_steps_before = self.runner.decode_graphs.steps if self.runner.decode_graphs else 0
        if self._grammars is not None:
            self._grammars.fill_seconds = self._grammars.wait_seconds = 0.0
        position = {self.add_request(req): i for i, req in enumerate(requests)}
        outputs: list[RequestOutput | None] = [None] * len(requests)
        idle_steps = 0
        try:
            while any(o is None for o in outputs):
                steps_before = self.stats.steps
                for out in self.step():
                    if out.index not in position:
                        continue  # a request added by someone else: not ours to return
                    out.index = position[out.index]
                    outputs[out.index] = out
                    if progress:
                        progress(out)
                idle_steps = idle_steps + 1 if self.stats.steps == steps_before else 0
                if idle_steps > 2 and any(o is None for o in outputs):
                    raise RuntimeError("engine made no progress: the scheduler found nothing to run")
        except BaseException:
            self.abort_all()  # leave the engine usable for the next call
            raise
        self.stats.wall_seconds = time.perf_counter() - start
        self.stats.vision_seconds = self.runner.vision_seconds - vision_before[0]
        self.stats.vision_patches = self.runner.vision_patches - vision_before[1]
        if self.runner.decode_graphs:
            self.stats.graph_steps = self.runner.decode_graphs.steps - graph_steps_before
        if self._grammars is not None:
            self.stats.mask_seconds, self.stats.mask_wait_seconds = self._grammars.seconds()
        return outputs

    def abort_all(self) -> None:
        """Drop every unfinished request (after a failed step), freeing the cache."""
        self.scheduler.abort_all()
        self._live.clear()
        self._refused.clear()

    def _step(self) -> list[Sequence]:
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
        masks = None
        if self._grammars is not None:  # masks of the rows due a token fill while the model runs
            due = [s for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed + n == s.num_tokens]
            masks = self._grammars.start_masks([s.matcher for s in due])
        if self.ranks is not None:
            with self.ranks.collective():
                to_sample, logits = self.runner.run(batch)
        else:
            to_sample, logits = self.runner.run(batch)
        if masks is not None:
            self._grammars.apply(logits, masks)
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
        if seq.matcher is not None:
            reason, error = advance(seq.matcher, token)
            if reason == "error":
                self.scheduler.finish(seq, "error", error)
                return True
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


def generate(
    model: Qwen2VL,
    inputs: Mapping | Seq[Mapping],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: Seq[int] | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (a processor output dict, or a list of them): the plain path of the
    engine, sized for these prompts (one packed prefill, then decodes; SDPA, no CUDA graphs).

    stop_token_ids None means the config's eos token; [] never stops early. A stop token is included in the
    output, as transformers does. seed makes sampling reproducible.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop_token_ids=() if stop_token_ids is None else tuple(stop_token_ids),
        ignore_eos=stop_token_ids is not None,
        seed=seed,
    )
    requests = [Request.from_inputs(_unpadded(p), params) for p in prompts]
    lengths = [len(r.prompt_token_ids) for r in requests]
    block_size = 16
    config = EngineConfig(
        max_batch_tokens=max(1, sum(lengths)),
        max_num_seqs=len(requests),
        num_kv_blocks=max(1, sum(blocks_needed(n + max_new_tokens, block_size) for n in lengths)),
        block_size=block_size,
        attention_backend="sdpa",
        cuda_graphs=False,
    )
    outputs = Engine(model, config).generate(requests)
    failed = next((o for o in outputs if o.finish_reason == "error"), None)
    if failed is not None:
        raise ValueError(f"prompt {failed.index}: {failed.error}")
    return [o.token_ids for o in outputs]


def _unpadded(inputs: Mapping) -> Mapping:
    """A processor output dict with input_ids of one prompt, padding (attention_mask 0) dropped."""
    if "input_ids" not in inputs:
        raise ValueError("each prompt must be a dict with input_ids (the processor's output)")
    ids = torch.as_tensor(inputs["input_ids"])
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(
                f"one prompt per dict: input_ids has batch size {ids.shape[0]}; pass a list of dicts instead"
            )
        mask = inputs.get("attention_mask")
        ids = ids[0] if mask is None else ids[0][torch.as_tensor(mask)[0].bool()]
    return {**inputs, "input_ids": ids}
