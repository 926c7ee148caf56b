"""Qwen2-VL: vision tower + Qwen2 decoder, with the reference's call signature for whole prompts."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.attention import AttentionContext, PackedPrefill
from model.config import Qwen2VLConfig
from model.language import LanguageModel
from model.parallel import SINGLE, ColumnParallelLinear, TensorParallel, check_layout
from model.rope import mrope_positions
from model.vision import VisionTransformer


def _as_grid(grid_thw) -> torch.Tensor | None:
    return None if grid_thw is None else torch.as_tensor(grid_thw).reshape(-1, 3).long()


class Qwen2VL(nn.Module):
    """Module names follow the published checkpoints: `visual.*`, `model.*` (the decoder), `lm_head`.
    With `tp` of size > 1 this is one rank's shard (model/parallel.py): the decoder and LM head split, the
    vision tower whole."""

    def __init__(self, config: Qwen2VLConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        check_layout(config, tp.size)
        self.config, self.tp = config, tp
        self.visual = VisionTransformer(config.vision)
        self.model = LanguageModel(config, tp)
        vocab = config.vocab_size
        self.lm_head = ColumnParallelLinear(config.hidden_size, vocab, tp.vocab_range(vocab), bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        tp: TensorParallel = SINGLE,
    ) -> Qwen2VL:
        """Build from a checkpoint directory (config.json + *.safetensors); weights go straight to device,
        each rank reading only its slices."""
        from model.weights import load_checkpoint

        config = Qwen2VLConfig.from_json(path)
        with torch.device("meta"):
            model = cls(config, tp)
        load_checkpoint(model, path, dtype=dtype, device=device)
        return model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # --- pieces the engines use -------------------------------------------------------------------------

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Many images and/or videos packed in one call -> (n_merged_tokens, hidden), items in grid order."""
        return self.visual(pixel_values.to(self.device), _as_grid(grid_thw))

    def _encode_optional(self, pixel_values, grid_thw) -> torch.Tensor | None:
        return None if pixel_values is None else self.encode_vision(pixel_values, grid_thw)

    def embed(self, input_ids: torch.Tensor, vision_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (n, hidden); image/video pad tokens take the rows of vision_embeds in order."""
        input_ids = input_ids.to(self.device)
        x = self.model.embed_tokens(input_ids)
        is_vision = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
        n_pads = int(is_vision.sum())
        n_embeds = 0 if vision_embeds is None else vision_embeds.shape[0]
        if n_pads != n_embeds:
            raise ValueError(
                f"the prompt has {n_pads} image/video pad tokens but {n_embeds} vision embeddings were "
                "given; each image/video needs t*h*w/merge^2 pad tokens (build prompts with the processor)"
            )
        if n_pads:
            x = x.index_put((is_vision.nonzero().squeeze(1),), vision_embeds.to(x.dtype))
        return x

    def prepare(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One prompt -> (input embeddings (S, hidden), M-RoPE positions (3, S), decode delta)."""
        ids = torch.as_tensor(input_ids).reshape(-1)
        image_grid_thw, video_grid_thw = _as_grid(image_grid_thw), _as_grid(video_grid_thw)
        positions, delta = mrope_positions(ids, image_grid_thw, video_grid_thw, self.config)
        images = self._encode_optional(pixel_values, image_grid_thw)
        videos = self._encode_optional(pixel_values_videos, video_grid_thw)
        embeds = self.embed(ids, self.vision_in_prompt_order(ids, images, videos))
        return embeds, positions.to(self.device), delta

    def vision_in_prompt_order(
        self, ids: torch.Tensor, image_embeds: torch.Tensor | None, video_embeds: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Interleave one prompt's image and video embeddings in the order their pad tokens appear."""
        if image_embeds is None and video_embeds is None:
            return None
        c = self.config
        pad_ids = ids[(ids == c.image_token_id) | (ids == c.video_token_id)].to(self.device)
        ref = image_embeds if image_embeds is not None else video_embeds
        out = ref.new_zeros(pad_ids.shape[0], ref.shape[1])
        for kind, token, embeds in (
            ("image", self.config.image_token_id, image_embeds),
            ("video", self.config.video_token_id, video_embeds),
        ):
            where = pad_ids == token
            n = 0 if embeds is None else embeds.shape[0]
            if int(where.sum()) != n:
                raise ValueError(
                    f"the prompt has {int(where.sum())} {kind} pad tokens but its {kind} grids give {n} "
                    "merged patches; each image/video needs t*h*w/merge^2 pad tokens (build prompts with "
                    "the processor)"
                )
            if n:
                out[where] = embeds
        return out

    def hidden_states(self, input_embeds: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext):
        """Packed embeddings (n, hidden) + positions (3, n) -> final hidden states (n, hidden)."""
        return self.model(input_embeds=input_embeds, position_ids=positions, ctx=ctx)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(n, vocab) logits; under tensor parallelism on rank 0 only (None on the others)."""
        return self.tp.gather_vocab(self.lm_head(hidden), self.config.vocab_size)

    # --- the reference's signature -------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, S) -> logits (B, S, vocab), None on tensor-parallel ranks but 0. Left/right
        padding is dropped via attention_mask (padded positions get zero logits); each row's images and
        videos follow one another in the grids."""
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        batch, seq = input_ids.shape
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask
        keep = torch.as_tensor(keep).bool().to(input_ids.device)
        image_grid_thw, video_grid_thw = _as_grid(image_grid_thw), _as_grid(video_grid_thw)
        per_image = self._per_item(self._encode_optional(pixel_values, image_grid_thw), image_grid_thw)
        per_video = self._per_item(self._encode_optional(pixel_values_videos, video_grid_thw), video_grid_thw)

        embeds, positions, lengths = [], [], []
        n_img = n_vid = 0  # images/videos consumed by earlier rows
        for row in range(batch):
            ids = input_ids[row][keep[row]]
            k_img, k_vid = self._count_items(ids)
            img_grid = None if image_grid_thw is None else image_grid_thw[n_img : n_img + k_img]
            vid_grid = None if video_grid_thw is None else video_grid_thw[n_vid : n_vid + k_vid]
            pos, _ = mrope_positions(ids, img_grid, vid_grid, self.config)
            img_emb = torch.cat(per_image[n_img : n_img + k_img]) if k_img else None
            vid_emb = torch.cat(per_video[n_vid : n_vid + k_vid]) if k_vid else None
            vision = self.vision_in_prompt_order(ids, img_emb, vid_emb)
            embeds.append(self.embed(ids, vision))
            positions.append(pos)
            lengths.append(ids.shape[0])
            n_img, n_vid = n_img + k_img, n_vid + k_vid

        cu_seqlens = torch.tensor([0] + lengths).cumsum(0)
        hidden = self.hidden_states(
            torch.cat(embeds), torch.cat(positions, dim=1).to(self.device), PackedPrefill(cu_seqlens)
        )
        packed_logits = self.logits(hidden)
        if packed_logits is None:  # a rank other than 0: its share is with rank 0
            return None
        if bool(keep.all()):
            return packed_logits.view(batch, seq, -1)
        logits = packed_logits.new_zeros(batch, seq, packed_logits.shape[-1])
        logits[keep.to(logits.device)] = packed_logits
        return logits

    def _per_item(self, embeds: torch.Tensor | None, grid_thw: torch.Tensor | None) -> list[torch.Tensor]:
        if embeds is None:
            return []
        return list(embeds.split((grid_thw.prod(-1) // self.config.vision.spatial_merge_size**2).tolist()))

    def _count_items(self, ids: torch.Tensor) -> tuple[int, int]:
        """Images and videos in a prompt: vision_start followed by an image or video pad token."""
        after_start = ids[1:][ids[:-1] == self.config.vision_start_token_id]
        return (
            int((after_start == self.config.image_token_id).sum()),
            int((after_start == self.config.video_token_id).sum()),
        )
