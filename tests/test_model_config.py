"""The published Qwen2-VL configs parse into the model the paper describes; other layouts and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import Qwen2VL, Qwen2VLConfig

CONFIGS = Path(__file__).resolve().parents[1] / "model" / "configs"
# Qwen2-VL paper, table 1: a 675M-parameter ViT in all three; about 2.2B / 8.3B / 73B in all (we count the
# merger, which projects to the LLM width, as part of the vision tower: hence the 5% slack there).
PAPER = {"2b": 2.2e9, "7b": 8.3e9, "72b": 73e9}
PAPER_VIT = 675e6


def published(size: str) -> Path:
    return CONFIGS / f"qwen2-vl-{size}-instruct.json"


@pytest.mark.parametrize("size", list(PAPER))
def test_published_config_parses_like_transformers(size):
    from transformers import Qwen2VLConfig as HFConfig

    ours = Qwen2VLConfig.from_json(published(size))
    raw = json.loads(published(size).read_text())
    ref = HFConfig(**raw)
    text = ref.text_config
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size) == (
        text.vocab_size, text.hidden_size, text.intermediate_size
    )
    assert (ours.num_hidden_layers, ours.num_attention_heads, ours.num_key_value_heads) == (
        text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads
    )
    assert ours.rope_theta == text.rope_theta and ours.rms_norm_eps == text.rms_norm_eps
    assert list(ours.mrope_section) == text.rope_scaling["mrope_section"]
    assert ours.tie_word_embeddings == ref.tie_word_embeddings
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(ours, name) == getattr(ref, name)
    v = ref.vision_config
    assert (ours.vision.depth, ours.vision.embed_dim, ours.vision.num_heads, ours.vision.hidden_size) == (
        v.depth, v.embed_dim, v.num_heads, v.hidden_size
    )
    assert (ours.vision.patch_size, ours.vision.temporal_patch_size, ours.vision.spatial_merge_size) == (
        v.patch_size, v.temporal_patch_size, v.spatial_merge_size
    )


def test_only_2b_ties_embeddings():
    tied = {size: Qwen2VLConfig.from_json(published(size)).tie_word_embeddings for size in PAPER}
    assert tied == {"2b": True, "7b": False, "72b": False}


@pytest.mark.parametrize("size", list(PAPER))
def test_parameter_counts_match_the_paper(size):
    config = Qwen2VLConfig.from_json(published(size))
    with torch.device("meta"):
        model = Qwen2VL(config)
    total = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    vision = sum(p.numel() for p in model.visual.parameters())
    print(f"Qwen2-VL-{size}: {total / 1e9:.3f}B parameters, vision tower {vision / 1e6:.1f}M")
    assert abs(total / PAPER[size] - 1) < 0.03
    assert abs(vision / PAPER_VIT - 1) < 0.05


def transformers5_layout(flat: dict) -> dict:
    """How transformers 5.x writes the same config: text numbers nested, rope in rope_parameters."""
    text_keys = [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "hidden_act", "use_sliding_window",
        "sliding_window", "max_window_layers", "attention_dropout", "initializer_range",
    ]
    text = {k: flat[k] for k in text_keys}
    text["model_type"] = "qwen2_vl_text"
    text["rope_parameters"] = {
        "rope_type": "default", "rope_theta": flat["rope_theta"],
        "mrope_section": flat["rope_scaling"]["mrope_section"],
    }
    vision = dict(flat["vision_config"])
    vision["in_channels"] = vision.pop("in_chans")
    top_keys = [
        "architectures", "model_type", "image_token_id", "video_token_id", "vision_start_token_id",
        "vision_end_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    ]
    out = {k: flat[k] for k in top_keys}
    return {**out, "dtype": flat["torch_dtype"], "text_config": text, "vision_config": vision}


@pytest.mark.parametrize("size", list(PAPER))
def test_transformers5_nested_layout_reads_the_same(size, tmp_path):
    flat = json.loads(published(size).read_text())
    (tmp_path / "config.json").write_text(json.dumps(transformers5_layout(flat)))
    assert Qwen2VLConfig.from_json(tmp_path) == Qwen2VLConfig.from_json(published(size))


@pytest.mark.parametrize("size", list(PAPER))
def test_written_config_round_trips(size):
    config = Qwen2VLConfig.from_json(published(size))
    assert Qwen2VLConfig.from_dict(config.to_hf_dict()) == config


def test_other_model_type_is_refused_naming_the_file(tmp_path):
    raw = json.loads(published("2b").read_text())
    raw["model_type"] = "qwen2_5_vl"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as err:
        Qwen2VLConfig.from_json(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value) and "qwen2_5_vl" in str(err.value)


def test_missing_config_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Qwen2VLConfig.from_json(tmp_path)


def test_mrope_section_must_cover_half_the_head(tmp_path):
    raw = json.loads(published("2b").read_text())
    raw["rope_scaling"]["mrope_section"] = [16, 24, 16]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen2VLConfig.from_json(tmp_path)


def test_token_ids_come_from_the_config(tmp_path):
    from model.rope import mrope_positions

    raw = json.loads(published("2b").read_text())
    raw["image_token_id"], raw["video_token_id"] = 7, 8
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = Qwen2VLConfig.from_json(tmp_path)
    # One image of 4x4 patches = 2x2 merged tokens, marked with the config's id 7 instead of 151655.
    positions, delta = mrope_positions([5, 7, 7, 7, 7, 6], torch.tensor([[1, 4, 4]]), None, config)
    assert positions.tolist() == [[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]]
    assert delta == 4 - 6
