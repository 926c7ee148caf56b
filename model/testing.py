"""A tiny random Qwen2-VL checkpoint on disk, in the real Hugging Face layout, for tests and the demo.

Its outputs are noise; it exists so every code path (config, safetensors, tokenizer, processor) runs
exactly as with a downloaded checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from model.config import Qwen2VLConfig, VisionConfig
from model.weights import INDEX_NAME

# Published numbers of Qwen2-VL's image processor (CLIP normalisation, 56x56 to 3584x3584 pixels).
PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}

# The chat template published with Qwen2-VL-*-Instruct (tokenizer_config.json), kept for tools that read it.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(**overrides: Any) -> Qwen2VLConfig:
    """Small numbers, real vocabulary and token ids (the real tokenizer must fit)."""
    vision_overrides = dict(overrides.pop("vision", None) or overrides.pop("vision_config", None) or {})
    hidden = overrides.get("hidden_size", 64)
    heads = overrides.get("num_attention_heads", 4)
    if "mrope_section" not in overrides:
        # Keep the published 16:24:24 proportions of head_dim/2.
        half = hidden // heads // 2
        t = max(1, half // 4)
        h = (half - t) // 2
        overrides["mrope_section"] = (t, h, half - t - h)
    vision = VisionConfig(depth=2, embed_dim=32, num_heads=2, hidden_size=hidden)
    vision = VisionConfig(**{**vision.__dict__, **vision_overrides})
    base = dict(
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
        vision=vision,
    )
    return Qwen2VLConfig(**{**base, **overrides})


def random_state_dict(
    config: Qwen2VLConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Deterministic random weights in the published key layout (no lm_head when embeddings are tied)."""
    from model.qwen2vl import Qwen2VL

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen2VL(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if "norm" in name or "ln_q" in name:
            # LayerNorm/RMSNorm scales near 1 and shifts near 0, perturbed so they matter in the tests.
            base = 1.0 if name.endswith("weight") else 0.0
            t = base + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith("bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif "embed_tokens" in name:
            t = torch.randn(shape, generator=gen)
        else:
            # Unit-variance outputs (std 1/sqrt(fan_in)) rather than the usual 0.02: attention is then far
            # from uniform, so a wrong position or patch order changes the logits well beyond round-off.
            fan_in = shape[1:].numel()
            t = torch.randn(shape, generator=gen) / fan_in**0.5
        state[name] = t.to(dtype).contiguous()
    return state


def to_saved_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published key names -> what transformers >= 4.52 writes (model.visual.*, model.language_model.*)."""
    out = {}
    for key, t in state.items():
        if key.startswith("visual."):
            key = "model." + key
        elif key.startswith("model."):
            key = "model.language_model." + key[len("model."):]
        out[key] = t
    return out


def write_safetensors(state: dict[str, torch.Tensor], directory: Path, shards: int = 1) -> None:
    """model.safetensors, or `shards` files plus model.safetensors.index.json."""
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(state, str(directory / "model.safetensors"), metadata=meta)
        return
    keys = sorted(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(directory / name), metadata=meta)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))


def make_tiny_checkpoint(
    path: str | Path,
    *,
    seed: int = 0,
    shards: int = 1,
    layout: str = "published",
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    **config_overrides: Any,
) -> Path:
    """Write a random Qwen2-VL checkpoint directory and return its path.

    layout "published" names weights like the released checkpoints, "transformers" like a model saved by
    transformers >= 4.52. config_overrides are Qwen2VLConfig fields (`vision={...}` for the vision tower).
    """
    if layout not in ("published", "transformers"):
        raise ValueError(f"layout must be 'published' or 'transformers', got {layout!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(**config_overrides)
    hf = config.to_hf_dict()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(hf, indent=2))

    state = random_state_dict(config, seed=seed, dtype=dtype)
    write_safetensors(to_saved_layout(state) if layout == "transformers" else state, path, shards=shards)

    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    generation = {
        "bos_token_id": config.bos_token_id,
        "pad_token_id": config.bos_token_id,
        "eos_token_id": [config.eos_token_id, config.bos_token_id],
    }
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    if tokenizer:
        from model.tokenizer import build_qwen2_tokenizer_json

        build_qwen2_tokenizer_json(path / "tokenizer.json")
    return path
