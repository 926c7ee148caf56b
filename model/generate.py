"""Simple generation for one or a few prompts: packed prefill into a KV cache, then one decode step per token.

The high-throughput path is the engine; this one is small and serves as its reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from model.attention import CachedAttention, KVCache
from model.qwen2vl import Qwen2VL
from model.rope import text_positions

_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits (B, vocab): argmax at temperature 0, else top-k, top-p, then a draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Keep a token while the tokens ranked above it hold less than top_p; the best one always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _prompt_args(inputs: Mapping) -> dict:
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
    args = {k: inputs[k] for k in _VISION_KEYS if inputs.get(k) is not None}
    return {"input_ids": ids, **args}


@torch.inference_mode()
def generate(
    model: Qwen2VL,
    inputs: Mapping | Sequence[Mapping],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (a processor output dict, or a list of them).

    stop_token_ids None means the config's eos token; [] never stops early. A stop token is included in the
    output, as transformers does. seed makes sampling reproducible.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    stops = {model.config.eos_token_id} if stop_token_ids is None else {int(t) for t in stop_token_ids}
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=model.device).manual_seed(seed)

    prepared = [model.prepare(**_prompt_args(p)) for p in prompts]
    lengths = [e.shape[0] for e, _, _ in prepared]
    deltas = [d for _, _, d in prepared]
    max_len = max(lengths) + max_new_tokens
    cache = KVCache.for_model(model.config, len(prompts), max_len, model.dtype, model.device)

    def step(embeds: torch.Tensor, positions: torch.Tensor, slots: list[int], counts: list[int]) -> list[int]:
        cu_seqlens = torch.tensor([0, *counts]).cumsum(0)
        ctx = CachedAttention(cache, slots, cu_seqlens)
        hidden = model.hidden_states(embeds, positions, ctx)
        ctx.finish()
        last = hidden[cu_seqlens[1:] - 1]  # logits only where a token is drawn
        return sample_next(model.logits(last), temperature, top_p, top_k, generator).tolist()

    embeds = torch.cat([e for e, _, _ in prepared])
    positions = torch.cat([p for _, p, _ in prepared], dim=1)
    first = step(embeds, positions, list(range(len(prompts))), lengths)
    outputs = [[t] for t in first]
    running = [i for i, t in enumerate(first) if t not in stops]
    for _ in range(max_new_tokens - 1):
        if not running:
            break
        tokens = torch.tensor([outputs[i][-1] for i in running], device=model.device)
        # The newest token sits at sequence index prompt length + generated - 1.
        positions = torch.cat(
            [text_positions(lengths[i] + len(outputs[i]) - 1, 1, deltas[i]) for i in running], dim=1
        ).to(model.device)
        new = step(model.model.embed_tokens(tokens), positions, running, [1] * len(running))
        for i, t in zip(running, new):
            outputs[i].append(t)
        running = [i for i in running if outputs[i][-1] not in stops]
    return outputs
