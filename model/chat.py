"""The Qwen2-VL chat template, written out in code (ChatML turns, one vision placeholder per image/video)."""

from __future__ import annotations

from collections.abc import Iterable

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


def item_kind(item: dict) -> str | None:
    """What a content item renders as, decided in the published template's order: image, video, text."""
    if not isinstance(item, dict):
        raise ValueError(
            f"message content items must be dicts like {{'type': 'text', 'text': ...}}, got {item!r}"
        )
    kind = item.get("type")
    if kind == "image" or "image" in item or "image_url" in item:
        return "image"
    if kind == "video" or "video" in item:
        return "video"
    if "text" in item:
        return "text"
    return None  # the template silently renders nothing for anything else


def render_chat(
    messages: Iterable[dict], add_generation_prompt: bool = True, add_vision_id: bool = False
) -> str:
    """Prompt text of a conversation, with one `<|image_pad|>` / `<|video_pad|>` per image / video."""
    out = []
    images = videos = 0
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if i == 0 and role != "system":
            out.append(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")
        out.append(f"<|im_start|>{role}\n")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list | tuple):
            for item in content:
                kind = item_kind(item)
                if kind == "image":
                    images += 1
                    out.append((f"Picture {images}: " if add_vision_id else "") + IMAGE_PLACEHOLDER)
                elif kind == "video":
                    videos += 1
                    out.append((f"Video {videos}: " if add_vision_id else "") + VIDEO_PLACEHOLDER)
                elif kind == "text":
                    out.append(str(item["text"]))
        else:
            raise ValueError(
                f"message {i} ({role}): content must be a string or a list of items, got {content!r}"
            )
        out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)
