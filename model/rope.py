"""Multimodal RoPE (M-RoPE): (temporal, height, width) position ids and the rotary tables built from them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from model.config import Qwen2VLConfig


def _grid_list(grid_thw: torch.Tensor | Sequence | None) -> list[list[int]]:
    if grid_thw is None:
        return []
    return torch.as_tensor(grid_thw).reshape(-1, 3).long().tolist()


def mrope_positions(
    token_ids: torch.Tensor | Sequence[int],
    image_grid_thw: torch.Tensor | Sequence | None,
    video_grid_thw: torch.Tensor | Sequence | None,
    config: Qwen2VLConfig,
) -> tuple[torch.Tensor, int]:
    """Position ids (3, S) of one sequence and its decode delta.

    Text advances all three rows together. An image/video of merged grid (t, h, w) placed after text
    ending at position p gets p+1 + (t_idx, h_idx, w_idx). Text after it resumes at 1 + the largest
    position of any row (the original Qwen2-VL rule; transformers 5.x differs for long videos).
    The grids are this sequence's images and videos in order of appearance.
    A token at index i >= S (generated) sits at position i + delta on all three rows.
    """
    ids = torch.as_tensor(token_ids).reshape(-1).tolist()
    images, videos = _grid_list(image_grid_thw), _grid_list(video_grid_thw)
    m = config.vision.spatial_merge_size
    pieces: list[torch.Tensor] = []
    next_pos = 0  # first free position: 1 + max of everything so far
    cursor = 0  # index into ids of the first token not yet placed
    n_img = n_vid = 0

    def find(token: int, remaining: bool) -> int:
        if not remaining:
            return len(ids)
        try:
            return ids.index(token, cursor)
        except ValueError:
            return len(ids)

    while n_img < len(images) or n_vid < len(videos):
        at_img = find(config.image_token_id, n_img < len(images))
        at_vid = find(config.video_token_id, n_vid < len(videos))
        if at_img == at_vid == len(ids):
            raise ValueError(
                f"{len(images) - n_img} image(s) and {len(videos) - n_vid} video(s) have no pad tokens left "
                "in the prompt; build input_ids with the processor so each image/video has its pad tokens"
            )
        if at_img < at_vid:
            (t, h, w), start = images[n_img], at_img
            n_img += 1
        else:
            (t, h, w), start = videos[n_vid], at_vid
            n_vid += 1
        h, w = h // m, w // m
        text_len = start - cursor
        pieces.append(torch.arange(text_len).expand(3, -1) + next_pos)
        base = next_pos + text_len
        grid = torch.stack(
            torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        ).flatten(1)
        pieces.append(grid + base)
        next_pos = base + max(t, h, w)
        cursor = start + t * h * w

    if cursor < len(ids):
        pieces.append(torch.arange(len(ids) - cursor).expand(3, -1) + next_pos)
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    if positions.shape[1] != len(ids):
        raise ValueError(
            f"the image/video grids and text cover {positions.shape[1]} tokens, the prompt has {len(ids)}; "
            "the number of pad tokens per image/video must equal t*h*w/merge^2 of its grid"
        )
    delta = (int(positions.max()) + 1 - len(ids)) if len(ids) else 0
    return positions, delta


def text_positions(start: int, count: int, delta: int = 0) -> torch.Tensor:
    """(3, count) positions for tokens at sequence indices start..start+count-1 (text or generated)."""
    return torch.arange(start + delta, start + delta + count).expand(3, -1)


class MRotary(nn.Module):
    """cos/sin tables for M-RoPE: frequency slot j rotates by the row its mrope section names."""

    def __init__(self, config: Qwen2VLConfig):
        super().__init__()
        self.head_dim = config.head_dim
        # Row (0=t, 1=h, 2=w) of each of the head_dim/2 frequencies.
        self.section_rows = [row for row, n in enumerate(config.mrope_section) for _ in range(n)]
        # Computed once on the CPU, like the reference, whatever device the model is built on.
        steps = torch.arange(0, self.head_dim, 2, dtype=torch.float, device="cpu")
        self.inv_freq_cpu = 1.0 / (config.rope_theta ** (steps / self.head_dim))
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._tables:
            rows = torch.tensor(self.section_rows, device=device)
            self._tables[device] = (self.inv_freq_cpu.to(device), rows)
        return self._tables[device]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (3, n) -> cos, sin (n, head_dim) in dtype, computed in float32."""
        inv_freq, rows = self._on(positions.device)
        freqs = (positions[rows].float() * inv_freq[:, None]).T  # (n, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (n, heads, head_dim) by per-token cos/sin (n, head_dim)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    # x * cos + rotate_half(x) * sin, the same operations in the same order, two temporaries fewer.
    return (x * cos).add_(rotate_half(x).mul_(sin))
