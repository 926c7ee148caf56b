"""Typed Qwen2-VL configuration, read from a Hugging Face config.json (published or transformers-5 layout)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class VisionConfig:
    """The ViT tower: patch embedding, `depth` blocks, 2x2 patch merger into the LLM width."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_size: int = 3584  # output width of the merger = LLM hidden size

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch: channels x temporal x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class Qwen2VLConfig:
    """Language model numbers, multimodal token ids and the nested vision config."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    torch_dtype: str = "bfloat16"
    vision: VisionConfig = field(default_factory=VisionConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(
                f"mrope_section {list(self.mrope_section)} must sum to head_dim/2 = {self.head_dim // 2}"
            )
        if self.vision.hidden_size != self.hidden_size:
            raise ValueError("vision_config.hidden_size must equal the language model hidden_size")

    @classmethod
    def from_json(cls, path: str | Path) -> Qwen2VLConfig:
        """Read config.json from a file or a checkpoint directory."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json here; point at a Qwen2-VL checkpoint directory")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<config dict>") -> Qwen2VLConfig:
        """Parse the flat published layout or the transformers-5 layout (text_config, rope_parameters)."""
        model_type = raw.get("model_type")
        if model_type != "qwen2_vl":
            raise ValueError(
                f"{source}: model_type is {model_type!r}, not 'qwen2_vl'; this loader only runs Qwen2-VL "
                "checkpoints (Qwen2-VL-2B/7B/72B-Instruct or fine-tunes of them)"
            )
        text = raw.get("text_config") or {}

        def get(key: str, default: Any = None) -> Any:
            # transformers 5 keeps text numbers in text_config; older files keep them at top level.
            if key in text:
                return text[key]
            return raw.get(key, default)

        if get("use_sliding_window", False):
            raise ValueError(f"{source}: use_sliding_window=true is not supported; Qwen2-VL ships with false")
        rope = get("rope_parameters") or get("rope_scaling") or {}
        if "mrope_section" not in rope:
            raise ValueError(f"{source}: no rope_scaling.mrope_section (nor rope_parameters.mrope_section)")
        rope_theta = rope.get("rope_theta", get("rope_theta", cls.rope_theta))

        v = raw.get("vision_config") or {}
        vd = VisionConfig()
        vision = VisionConfig(
            depth=v.get("depth", vd.depth),
            embed_dim=v.get("embed_dim", vd.embed_dim),
            num_heads=v.get("num_heads", vd.num_heads),
            mlp_ratio=v.get("mlp_ratio", vd.mlp_ratio),
            in_channels=v.get("in_channels", v.get("in_chans", vd.in_channels)),
            patch_size=v.get("patch_size", v.get("spatial_patch_size", vd.patch_size)),
            temporal_patch_size=v.get("temporal_patch_size", vd.temporal_patch_size),
            spatial_merge_size=v.get("spatial_merge_size", vd.spatial_merge_size),
            hidden_size=v.get("hidden_size", get("hidden_size")),
        )
        if v.get("hidden_act", "quick_gelu") != "quick_gelu" or get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: only hidden_act silu (text) and quick_gelu (vision) are supported")

        d = cls()
        eos = raw.get("eos_token_id", get("eos_token_id", d.eos_token_id))
        # The top level decides tying in every layout; text_config may carry a stale default.
        tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        try:
            return cls(
                vocab_size=get("vocab_size"),
                hidden_size=get("hidden_size"),
                intermediate_size=get("intermediate_size"),
                num_hidden_layers=get("num_hidden_layers"),
                num_attention_heads=get("num_attention_heads"),
                num_key_value_heads=get("num_key_value_heads") or get("num_attention_heads"),
                rms_norm_eps=get("rms_norm_eps", d.rms_norm_eps),
                rope_theta=float(rope_theta),
                mrope_section=tuple(rope["mrope_section"]),
                max_position_embeddings=get("max_position_embeddings", d.max_position_embeddings),
                tie_word_embeddings=bool(tie),
                image_token_id=raw.get("image_token_id", d.image_token_id),
                video_token_id=raw.get("video_token_id", d.video_token_id),
                vision_start_token_id=raw.get("vision_start_token_id", d.vision_start_token_id),
                vision_end_token_id=raw.get("vision_end_token_id", d.vision_end_token_id),
                bos_token_id=raw.get("bos_token_id", get("bos_token_id", d.bos_token_id)),
                eos_token_id=eos[0] if isinstance(eos, list) else eos,
                torch_dtype=str(raw.get("torch_dtype", raw.get("dtype", get("torch_dtype", d.torch_dtype)))),
                vision=vision,
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: not a usable Qwen2-VL config: {e}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """The flat config.json layout of the published checkpoints."""
        vision = asdict(self.vision)
        vision["in_chans"] = vision.pop("in_channels")
        vision["spatial_patch_size"] = self.vision.patch_size
        nested = ("vision", "mrope_section", "rope_theta")
        top = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in nested}
        return {
            "architectures": ["Qwen2VLForConditionalGeneration"],
            "model_type": "qwen2_vl",
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "max_window_layers": self.num_hidden_layers,
            "rope_theta": self.rope_theta,
            "sliding_window": 32768,
            "use_cache": True,
            "use_sliding_window": False,
            **top,
            "vision_config": vision,
            "rope_scaling": {"type": "mrope", "mrope_section": list(self.mrope_section)},
        }


def read_eos_token_ids(path: str | Path) -> list[int]:
    """End-of-sequence ids of a checkpoint directory: config.json's, then generation_config.json's."""
    path = Path(path)
    ids = [Qwen2VLConfig.from_json(path).eos_token_id]
    gen_config = path / "generation_config.json"
    if gen_config.is_file():
        value = json.loads(gen_config.read_text()).get("eos_token_id")
        ids += [value] if isinstance(value, int) else list(value or [])
    return list(dict.fromkeys(ids))
