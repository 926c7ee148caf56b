"""Qwen2-VL vision tower: many images and video slices packed into one sequence, no padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import VisionConfig
from model.rope import rotate_half
from model.scratch import map_rows


def vision_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Boundaries of the attention blocks: one block per image and per temporal slice of a video."""
    grid = grid_thw.long().cpu()
    lengths = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0])
    return F.pad(lengths.cumsum(0), (1, 0))


def patch_rows_cols(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of each patch in the processor's order: merge windows row-major, then inside each window."""
    out = []
    for t, h, w in grid_thw.long().tolist():
        # The processor walks 2x2 merge windows row-major, and patches row-major inside each window.
        win_r, win_c, in_r, in_c = torch.meshgrid(
            torch.arange(h // merge), torch.arange(w // merge), torch.arange(merge), torch.arange(merge),
            indexing="ij",
        )
        rc = torch.stack([(win_r * merge + in_r).flatten(), (win_c * merge + in_c).flatten()], dim=-1)
        out.append(rc.repeat(t, 1))
    return torch.cat(out)


class VisionRotary(nn.Module):
    """2D rotary embedding: half of each head's rotary frequencies follow the row, half the column."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.rot_dim = head_dim // 2
        self.theta = theta

    def forward(self, rows_cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.rot_dim, 2, dtype=torch.float) / self.rot_dim))
        inv_freq = inv_freq.to(rows_cols.device)
        freqs = (rows_cols.float()[..., None] * inv_freq).flatten(1)  # (n, rot_dim): row freqs then col freqs
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def apply_vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (n, heads, head_dim) in float32, as the reference does, then return to x's dtype."""
    xf = x.float()
    cos, sin = cos[:, None, :], sin[:, None, :]
    # xf * cos + rotate_half(xf) * sin, the same operations in the same order, in place where a temporary
    # of ours can take the result: two fewer (n, heads, head_dim) allocations per call.
    return (xf * cos).add_(rotate_half(xf).mul_(sin)).to(x.dtype)


def block_diagonal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int]):
    """Full attention inside each block of a packed (n, heads, dim) sequence.

    Consecutive blocks of equal length (frames of one video, same-size images) run as one batched call.
    """
    out = torch.empty_like(q)  # each call's result is copied once, into place
    bounds = list(zip(cu_seqlens[:-1], cu_seqlens[1:]))
    i = 0
    while i < len(bounds):
        start, end = bounds[i]
        length = end - start
        j = i + 1
        while j < len(bounds) and bounds[j][1] - bounds[j][0] == length:
            j += 1
        stop = bounds[j - 1][1]
        qb, kb, vb = (x[start:stop].unflatten(0, (j - i, length)).transpose(1, 2) for x in (q, k, v))
        result = F.scaled_dot_product_attention(qb, kb, vb)  # (blocks, heads, length, dim)
        out[start:stop].unflatten(0, (j - i, length)).copy_(result.transpose(1, 2))
        i = j
    return out


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: list[int]):
        # Three projections rather than one (n, 3 * embed_dim) output, which passes 32 MiB on a full vision
        # call (16384 x 768 floats in the CPU bench) and is then faulted in afresh every layer (see
        # model/scratch.py). The columns are the same numbers.
        q, k, v = (
            F.linear(x, w, b).unflatten(-1, (self.num_heads, -1))
            for w, b in zip(self.qkv.weight.chunk(3), self.qkv.bias.chunk(3))
        )
        q, k = apply_vision_rotary(q, cos, sin), apply_vision_rotary(k, cos, sin)
        return self.proj(block_diagonal_attention(q, k, v, cu_seqlens).flatten(1))


class QuickGELU(nn.Module):
    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(1.702 * x)
        return x.mul_(gate) if self.inplace else x * gate


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.act = QuickGELU(inplace=True)  # overwrites fc1's output, a buffer nobody else holds
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return map_rows(lambda rows: self.fc2(self.act(self.fc1(rows))), x, self.fc1.out_features)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Conv3d with kernel = stride = one patch, i.e. a matmul over flattened patches.

    The Conv3d module only holds the published (embed_dim, C, T, P, P) weight; running it as a matmul
    avoids reshaping every patch into a 5-D tensor and is what the kernel computes anyway.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(patches.to(w.dtype), w.flatten(1))


class PatchMerger(nn.Module):
    """Concatenate each 2x2 window of patch features and project to the LLM width."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.merged_dim = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim),
            nn.GELU(),
            nn.Linear(self.merged_dim, cfg.hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Patches of one window are adjacent in the processor's order, so a reshape merges them.
        return self.mlp(self.ln_q(x).reshape(-1, self.merged_dim))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.rotary = VisionRotary(cfg.head_dim)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """(n_patches, patch_dim) pixels of many images/videos -> (n_patches / merge^2, LLM hidden)."""
        grid_thw = torch.as_tensor(grid_thw).reshape(-1, 3)
        n_patches = int(grid_thw.prod(-1).sum())
        if pixel_values.shape != (n_patches, self.cfg.patch_dim):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but grid_thw {grid_thw.tolist()} needs "
                f"({n_patches}, {self.cfg.patch_dim}); pass the processor's pixel_values with its grid_thw"
            )
        m = self.cfg.spatial_merge_size
        if bool((grid_thw[:, 1:] % m).any()):
            raise ValueError(f"grid_thw {grid_thw.tolist()}: height and width must be multiples of {m}")
        x = self.patch_embed(pixel_values)
        cos, sin = self.rotary(patch_rows_cols(grid_thw, m).to(x.device))
        cu_seqlens = vision_cu_seqlens(grid_thw).tolist()
        for block in self.blocks:
            x = block(x, cos, sin, cu_seqlens)
        return self.merger(x)
