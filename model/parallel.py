"""Tensor parallelism of the language model: which slice of each weight a rank holds, and its collectives.

A rank holds a range of the attention heads (query heads split evenly; key/value heads split too, or, where
there are fewer of them than ranks, the one its query heads read), a range of the MLP's inner dimension
and a range of the vocabulary (embedding and LM head). Column-parallel layers compute their output rows
locally; row-parallel layers (o_proj, down_proj) and the embedding sum their partial results with one
all_reduce, so every rank holds the whole hidden state between layers. The vision tower is replicated:
sharding its fused q/k/v would not split along heads and costs communication for little gain.

At size 1 every layer is the plain `nn.Linear` / `nn.Embedding` it subclasses, parameter names unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Shard:
    """A parameter's slice of the checkpoint tensor: [lo, hi) along `dim` of a tensor `full` long there."""

    dim: int
    lo: int
    hi: int
    full: int

    @property
    def whole(self) -> bool:
        return self.lo == 0 and self.hi == self.full


def even_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rank's part of n things split evenly (n must divide by size)."""
    per = n // size
    return rank * per, (rank + 1) * per


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among the engine's ranks; `group` is their torch.distributed group (size > 1)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    def head_ranges(self, n_heads: int, n_kv_heads: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(query heads, key/value heads) of this rank."""
        q = even_range(n_heads, self.rank, self.size)
        if n_kv_heads >= self.size:
            return q, even_range(n_kv_heads, self.rank, self.size)
        kv = q[0] // (n_heads // n_kv_heads)  # the one kv head this rank's query heads share
        return q, (kv, kv + 1)

    def vocab_range(self, vocab: int) -> tuple[int, int]:
        """This rank's rows of the vocabulary: equal chunks, the last one shorter if vocab does not divide."""
        chunk = -(-vocab // self.size)
        return min(vocab, self.rank * chunk), min(vocab, (self.rank + 1) * chunk)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, local: torch.Tensor, vocab: int) -> torch.Tensor | None:
        """Each rank's vocabulary columns of (n, local vocab) logits -> the whole (n, vocab) on rank 0, None
        elsewhere."""
        if self.size == 1:
            return local
        chunk = -(-vocab // self.size)
        if local.shape[1] < chunk:
            local = F.pad(local, (0, chunk - local.shape[1]))
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)] if self.rank == 0 else None
        torch.distributed.gather(local, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=1)[:, :vocab] if self.rank == 0 else None


SINGLE = TensorParallel()


def split_sizes(config) -> list[int]:
    """Tensor-parallel sizes the model's shapes split into: whole heads, whole key/value heads (or one
    each), an even share of the MLP on every rank."""
    heads, kv, inner = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    return [
        n for n in range(1, heads + 1) if heads % n == 0 and inner % n == 0 and (kv % n == 0 or n % kv == 0)
    ]


def check_layout(config, size: int) -> None:
    """Refuse a tensor-parallel size the model's shapes do not split into, saying what would."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    fits = split_sizes(config)
    if size not in fits:
        heads, kv, inner = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
        raise ValueError(
            f"tensor_parallel_size={size} does not split this model ({heads} attention heads, {kv} key/value "
            f"heads, MLP {inner}): each rank needs whole heads; use one of {fits}"
        )


class ColumnParallelLinear(nn.Linear):
    """Output rows [lo, hi) of a linear layer `out_features` wide: a range of heads, of the MLP's inner
    dimension or of the vocabulary. No communication."""

    def __init__(self, in_features: int, out_features: int, rows: tuple[int, int], bias: bool):
        lo, hi = rows
        super().__init__(in_features, hi - lo, bias=bias)
        self.shards = {"weight": Shard(0, lo, hi, out_features)}
        if bias:
            self.shards["bias"] = Shard(0, lo, hi, out_features)


class RowParallelLinear(nn.Linear):
    """Input columns [lo, hi) of a bias-free linear layer; the partial products are summed over ranks."""

    def __init__(self, in_features: int, out_features: int, cols: tuple[int, int], tp: TensorParallel):
        lo, hi = cols
        super().__init__(hi - lo, out_features, bias=False)
        self.shards = {"weight": Shard(1, lo, hi, in_features)}
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight))


class VocabParallelEmbedding(nn.Embedding):
    """Rows [lo, hi) of the token embedding; ids outside them give zeros, and the ranks' rows are summed."""

    def __init__(self, vocab: int, dim: int, tp: TensorParallel):
        lo, hi = tp.vocab_range(vocab)
        super().__init__(hi - lo, dim)
        self.shards = {"weight": Shard(0, lo, hi, vocab)}
        self.tp, self.lo = tp, lo

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(ids)
        local = ids - self.lo
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill_(outside[:, None], 0))


def parameter_shards(model: nn.Module) -> dict[str, Shard]:
    """Every sliced parameter of `model` by its state-dict name (parameters not listed are whole)."""
    out = {}
    for prefix, module in model.named_modules():
        for name, shard in getattr(module, "shards", {}).items():
            if not shard.whole:
                out[f"{prefix}.{name}" if prefix else name] = shard
    return out


def rank_parameter_counts(config, size: int) -> list[int]:
    """Parameters each of `size` ranks holds (its decoder shard and the whole vision tower), counted on the
    meta device."""
    from model.qwen2vl import Qwen2VL

    counts = []
    with torch.device("meta"):
        for rank in range(size):
            model = Qwen2VL(config, TensorParallel(rank, size))
            counts.append(sum(p.numel() for p in model.parameters()))
    return counts
