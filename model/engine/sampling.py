"""Sampling parameters of one request and the batched sampler of the engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_SEED_MASK = (1 << 63) - 1


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops. temperature 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    stop: tuple[str, ...] = ()  # stop strings; need a tokenizer on the engine
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # keep going past the model's end-of-sequence token
    seed: int | None = None  # same seed, same tokens, whatever else shares the batch
    logprobs: int = 0  # top-n log-probabilities to return for each generated token
    json_schema: dict | str | None = None  # the output must be one JSON value of this schema (constrained)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 disables it), got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("SamplingParams.stop must not contain an empty string")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf what each row's top-k and then top-p cut removes; ties at the k-th value are kept."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    kth = sorted_logits.gather(-1, (k - 1).unsqueeze(-1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # A token survives top-p when the tokens ranked above it hold less than top_p of the mass; the first
    # always survives.
    mass_above = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_above >= top_p.unsqueeze(-1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def _request_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    # Seeded from (seed, index of the token being drawn): the draw never depends on batch neighbours, and a
    # request preempted and recomputed draws the same tokens again.
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) & _SEED_MASK)
    return gen


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    steps: list[int],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of float logits (B, V); `steps` is each row's number of tokens drawn so far.

    Rows without a seed draw from `generator` (or torch's default one)."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    device = logits.device
    index = torch.tensor(rows, device=device)
    temps = torch.tensor([params[i].temperature for i in rows], device=device, dtype=logits.dtype)
    top_k = torch.tensor([params[i].top_k for i in rows], device=device)
    top_p = torch.tensor([params[i].top_p for i in rows], device=device, dtype=logits.dtype)
    scaled = logits.index_select(0, index) / temps.unsqueeze(-1)
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        scaled = filter_top_k_top_p(scaled, top_k, top_p)
    probs = scaled.softmax(dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p, and each row's noise comes from its
    # own generator.
    noise = torch.empty_like(probs)
    for j, i in enumerate(rows):
        seed = params[i].seed
        gen = generator if seed is None else _request_generator(seed, steps[i], device)
        noise[j].exponential_(generator=gen)
    tokens[index] = (probs / noise).argmax(dim=-1)
    return tokens


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> list[dict[int, float]]:
    """Log-probabilities of each row's chosen token and of its n most likely tokens (raw logits, T=1)."""
    logp = logits.float().log_softmax(dim=-1)
    values, ids = logp.topk(n, dim=-1)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    out = []
    for row in range(logits.shape[0]):
        entry = dict(zip(ids[row].tolist(), values[row].tolist()))
        entry[int(tokens[row])] = float(chosen[row])
        out.append(entry)
    return out
