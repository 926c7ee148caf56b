"""Checkpoint loading: both key layouts, shards, tied heads, dtype, and refusals that name the file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import Qwen2VL
from model.testing import make_tiny_checkpoint
from model.weights import canonical_key, checkpoint_files

# Weight plumbing needs no real vocabulary: a small one keeps these checkpoints a few hundred kB.
SMALL = dict(vocab_size=4096, num_hidden_layers=1, vision={"depth": 1}, tokenizer=False)


def prompt() -> torch.Tensor:
    return torch.randint(0, 4096, (1, 12), generator=torch.Generator().manual_seed(1))


def assert_same_weights(a: Qwen2VL, b: Qwen2VL) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_both_key_layouts_load_the_same_model(tmp_path):
    published = make_tiny_checkpoint(tmp_path / "published", seed=3, **SMALL)
    saved = make_tiny_checkpoint(tmp_path / "saved", seed=3, layout="transformers", **SMALL)
    saved_keys = load_file(saved / "model.safetensors").keys()
    assert any(k.startswith("model.language_model.") for k in saved_keys)
    assert any(k.startswith("model.visual.") for k in saved_keys)
    a, b = Qwen2VL.from_pretrained(published), Qwen2VL.from_pretrained(saved)
    assert_same_weights(a, b)
    ids = prompt()
    assert torch.equal(a(input_ids=ids), b(input_ids=ids))


def test_canonical_key_maps_saved_names():
    assert canonical_key("model.visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"
    up = "model.layers.3.mlp.up_proj.weight"
    assert canonical_key("model.language_model.layers.3.mlp.up_proj.weight") == up
    assert canonical_key(up) == up
    assert canonical_key("lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize("layout", ["published", "transformers"])
def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, layout):
    single = make_tiny_checkpoint(tmp_path / "single", seed=5, **SMALL)
    sharded = make_tiny_checkpoint(tmp_path / "sharded", seed=5, shards=3, layout=layout, **SMALL)
    assert len(checkpoint_files(sharded)) == 3 and not (sharded / "model.safetensors").exists()
    assert_same_weights(Qwen2VL.from_pretrained(single), Qwen2VL.from_pretrained(sharded))


def test_missing_shard_is_named(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", shards=2, **SMALL)
    gone = ckpt / "model-00002-of-00002.safetensors"
    gone.unlink()
    with pytest.raises(FileNotFoundError) as err:
        Qwen2VL.from_pretrained(ckpt)
    assert str(gone) in str(err.value)


def test_pickle_checkpoint_is_refused_without_unpickling(tmp_path, monkeypatch):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", **SMALL)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not to be unpickled")

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(ValueError) as err:
        Qwen2VL.from_pretrained(ckpt)
    assert str(ckpt / "pytorch_model.bin") in str(err.value) and "safetensors" in str(err.value)


def test_config_of_another_model_is_refused_naming_the_file(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", **SMALL)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["model_type"] = "llava"
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as err:
        Qwen2VL.from_pretrained(ckpt)
    assert str(ckpt / "config.json") in str(err.value)


def rewrite(ckpt, change) -> None:
    state = load_file(ckpt / "model.safetensors")
    change(state)
    save_file(state, str(ckpt / "model.safetensors"))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", **SMALL)

    def change(state):
        state.pop("model.layers.0.self_attn.q_proj.bias")
        state["model.layers.0.self_attn.rotary.inv_freq"] = torch.zeros(4)

    rewrite(ckpt, change)
    with pytest.raises(ValueError) as err:
        Qwen2VL.from_pretrained(ckpt)
    msg = str(err.value)
    assert str(ckpt) in msg
    assert "missing" in msg and "model.layers.0.self_attn.q_proj.bias" in msg
    assert "unexpected" in msg and "model.layers.0.self_attn.rotary.inv_freq" in msg


def test_shape_mismatch_names_tensor_and_file(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", **SMALL)
    rewrite(ckpt, lambda state: state.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(ValueError) as err:
        Qwen2VL.from_pretrained(ckpt)
    assert "model.norm.weight" in str(err.value) and str(ckpt / "model.safetensors") in str(err.value)


def test_tied_head_uses_the_embedding_like_transformers(tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    ckpt = make_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True, **SMALL)
    assert "lm_head.weight" not in load_file(ckpt / "model.safetensors")
    ours = Qwen2VL.from_pretrained(ckpt)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ref = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, attn_implementation="sdpa").eval()
    ids = prompt()
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    got = ours(input_ids=ids)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_dtype_and_device_are_the_callers(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", **SMALL)
    model = Qwen2VL.from_pretrained(ckpt, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    logits = model(input_ids=prompt())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
