"""How many visual tokens one unit may take: the model's context less the prompt's text and the answer.

The decode stage sizes every video window and page under this budget, `vlbatch plan` counts with the same
numbers, and the GPU stage's engine is built with the same context, so a unit that leaves decode always
fits the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from schemas import CaptionVideosJob, OcrDocumentsJob


@dataclass(frozen=True)
class TokenBudget:
    """One unit's sequence: `text_tokens` of prompt, visual tokens, then up to `max_new_tokens` generated."""

    context: int  # tokens one sequence may hold (prompt + generated)
    text_tokens: int  # the prompt's text tokens, chat template included
    max_new_tokens: int

    @property
    def visual_tokens(self) -> int:
        """The most visual tokens a unit may have (may be <= 0: then nothing fits)."""
        return self.context - self.text_tokens - self.max_new_tokens

    def describe(self) -> str:
        return (
            f"the model's context of {self.context:,} tokens leaves {self.visual_tokens:,} for visual tokens "
            f"after the prompt's {self.text_tokens} text tokens and sampling.max_new_tokens="
            f"{self.max_new_tokens}"
        )


def model_context(model_path: str | Path, max_model_len: int | None = None) -> int:
    """The job's `max_model_len`, else the checkpoint's `max_position_embeddings` (config.json)."""
    if max_model_len is not None:
        return max_model_len
    path = Path(model_path) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the model's config ({e}); --model must be a checkpoint") from e
    text = config.get("text_config") or {}  # newer exports nest the language model's settings
    value = config.get("max_position_embeddings", text.get("max_position_embeddings"))
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: no max_position_embeddings; set max_model_len in the job spec")
    return value


def token_budget(job: CaptionVideosJob | OcrDocumentsJob, processor=None) -> TokenBudget:
    """The budget of every unit of `job` (its prompt is the same for every unit, so is its text)."""
    from model.processor import Processor
    from pipeline.prepare import messages_for, visual_item
    from pipeline.tasks import task_of

    processor = processor or Processor.from_pretrained(job.model)
    shape = list(task_of(job).sample_shape)
    prompt = processor.count_tokens(messages_for(visual_item(shape), job.prompt, job.system_prompt))
    context = model_context(job.model, job.max_model_len)
    return TokenBudget(context, prompt.text_tokens, job.sampling.max_new_tokens)


GB = 1e9
# The CUDA context, a step's activations and the allocator's slack: never counted as KV-cache room.
CUDA_OVERHEAD_BYTES = 2 << 30


@dataclass(frozen=True)
class GpuLayout:
    """How a job's model sits on the GPUs of one inference worker: weights and KV cache per GPU."""

    model: str
    tensor_parallel_size: int
    weights_bytes: int  # on each GPU (its rank's shard of the decoder and the whole vision tower)
    kv_bytes_per_token: int  # on each GPU (its rank's key/value heads)
    gpu_bytes: int | None  # each GPU's memory (times gpus_per_worker where workers share one); None: unknown
    gpu_source: str  # where gpu_bytes comes from
    context: int  # tokens one sequence may hold
    fits_sizes: tuple[int, ...]  # tensor-parallel sizes this model splits into

    @property
    def kv_tokens(self) -> int | None:
        """Tokens the KV cache of one worker holds: the engine's share of what the weights leave."""
        from model.engine.kv_cache import CUDA_KV_CACHE_FRACTION

        if self.gpu_bytes is None:
            return None
        room = CUDA_KV_CACHE_FRACTION * (self.gpu_bytes - self.weights_bytes - CUDA_OVERHEAD_BYTES)
        return max(0, int(room // self.kv_bytes_per_token))

    def problem(self) -> str | None:
        """Why this layout cannot run (weights do not fit, or no room for one sequence), or None."""
        if self.gpu_bytes is None:
            return None
        tokens = self.kv_tokens
        if tokens >= self.context:
            return None
        bigger = [n for n in self.fits_sizes if n > self.tensor_parallel_size]
        fix = f"set resources.gpus_per_worker to {bigger[0]}" if bigger else "use GPUs with more memory"
        have = f"{self.gpu_bytes / GB:.0f} GB per GPU ({self.gpu_source})"
        if self.weights_bytes + CUDA_OVERHEAD_BYTES >= self.gpu_bytes:
            what = f"its weights take {self.weights_bytes / GB:.1f} GB per GPU"
        else:
            what = (
                f"the KV cache left beside {self.weights_bytes / GB:.1f} GB of weights holds {tokens:,} "
                f"tokens, fewer than one sequence of the model's context ({self.context:,})"
            )
            fix += " or lower max_model_len"
        layout = f"gpus_per_worker={self.tensor_parallel_size}"
        return f"{self.model} does not fit with {layout} on {have}: {what}; {fix}"

    def describe(self) -> list[str]:
        ranks = self.tensor_parallel_size
        spread = f"sharded over {ranks} GPUs, vision tower on each" if ranks > 1 else "one GPU"
        lines = [f"  weights per GPU    {self.weights_bytes / GB:>14,.1f}   GB ({spread})"]
        if self.gpu_bytes is None:
            lines.append("  KV cache room      unknown: set resources.gpu_memory_gb to check the fit")
        else:
            lines.append(
                f"  KV cache room      {self.kv_tokens:>14,}   tokens per worker, on "
                f"{self.gpu_bytes / GB:.0f} GB per GPU ({self.gpu_source})"
            )
        return lines


def gpu_layout(job) -> GpuLayout:
    """The job's model on its workers' GPUs: `resources.gpu_memory_gb`, else this machine's first GPU."""
    import torch

    from model.config import Qwen2VLConfig
    from model.engine.kv_cache import CacheShape
    from model.parallel import TensorParallel, check_layout, rank_parameter_counts, split_sizes

    config = Qwen2VLConfig.from_json(job.model)
    r = job.resources
    size = r.tensor_parallel_size
    check_layout(config, size)
    dtype = getattr(torch, job.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    weights = max(rank_parameter_counts(config, size)) * elem
    per_token = CacheShape.for_model(config, 1, TensorParallel(0, size)).bytes_per_block(dtype)
    gpu_bytes, source = None, ""
    if job.device != "cpu":
        if r.gpu_memory_gb is not None:
            gpu_bytes, source = int(r.gpu_memory_gb * GB), "resources.gpu_memory_gb"
        elif torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            gpu_bytes, source = props.total_memory, f"this machine's {props.name}"
        if gpu_bytes is not None and r.gpus_per_worker < 1:
            gpu_bytes = int(gpu_bytes * r.gpus_per_worker)  # workers sharing a GPU each get their share
    fits = tuple(split_sizes(config))
    context = model_context(job.model, job.max_model_len)
    return GpuLayout(str(job.model), size, weights, per_token, gpu_bytes, source, context, fits)

