"""Load Qwen2-VL safetensors checkpoints: single or sharded, published or transformers-saved key layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# transformers >= 4.52 saves the model under `model.visual` / `model.language_model`; the published
# checkpoints (and this package) use `visual` / `model`.
_SAVED_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def canonical_key(key: str) -> str:
    """Map a checkpoint key of either layout to this package's (the published) name."""
    for saved, ours in _SAVED_PREFIXES:
        if key.startswith(saved):
            return ours + key[len(saved):]
    return key


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory; refuses pickles and names missing shards."""
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise ValueError(_pickle_message(path))
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: not a .safetensors file; point at a Qwen2-VL checkpoint directory")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from e
        shards = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index} lists shard(s) that are not on disk: {', '.join(str(m) for m in missing)}; "
                "download the complete checkpoint"
            )
        return shards
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(_pickle_message(pickles[0]))
    raise FileNotFoundError(f"{path}: no *.safetensors weights found")


def _pickle_message(path: Path) -> str:
    return (
        f"{path}: pickle checkpoints (.bin/.pt) are refused because loading them can run arbitrary code; "
        "convert it to safetensors (e.g. load it once in a trusted environment and save_pretrained with "
        "safe_serialization=True) or download the .safetensors files of the checkpoint"
    )


def load_checkpoint(
    model: nn.Module, path: str | Path, dtype: torch.dtype, device: torch.device | str
) -> None:
    """Fill `model` (built on the meta device, or anywhere) with the checkpoint's tensors in dtype on device.

    Each tensor goes straight from the file to `device` and `dtype`; no float32 copy of the model is made.
    A tensor-parallel shard reads only its slice of each split tensor (`get_slice`), never the whole.
    """
    from model.parallel import parameter_shards

    device = torch.device(device)
    expected = dict(model.state_dict(keep_vars=True))
    shards = parameter_shards(model)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                name = canonical_key(key)
                if name == "lm_head.weight" and tied:
                    continue  # tied models use the embedding matrix as the head, as the reference does
                if name not in expected:
                    unexpected.append(f"{key} (in {file.name})")
                    continue
                want = list(expected[name].shape)
                shard = shards.get(name)
                if shard is not None:
                    want[shard.dim] = shard.full
                part = f.get_slice(key) if shard is not None else f.get_tensor(key)
                shape = tuple(part.get_shape()) if shard is not None else tuple(part.shape)
                if shape != tuple(want):
                    raise ValueError(
                        f"{file}: tensor {key} has shape {shape}, the config expects "
                        f"{tuple(want)}; config.json and weights come from different models"
                    )
                if shard is not None:
                    rows = slice(shard.lo, shard.hi)
                    part = (part[rows] if shard.dim == 0 else part[:, rows]).to(device)
                state[name] = part.to(dtype) if part.is_floating_point() else part
    if tied:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    if missing or unexpected:
        raise ValueError(_key_report(Path(path), missing, unexpected))
    model.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def _key_report(path: Path, missing: list[str], unexpected: list[str], show: int = 12) -> str:
    lines = [f"{path}: the checkpoint does not match the Qwen2-VL layout of config.json"]
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" ... and {len(keys) - show} more" if len(keys) > show else ""
            lines.append(f"  {len(keys)} {label} key(s): {', '.join(keys[:show])}{more}")
    return "\n".join(lines)
