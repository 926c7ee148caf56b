"""Decoding under a JSON schema: every constrained sequence carries an llguidance matcher of its schema.

Each step, the masks of the constrained rows due a token are filled in a background thread while the model
runs (llguidance drops the GIL, and fills the rows of a batch in parallel), one bit per vocabulary entry.
They are applied to those rows' logits only, so an unconstrained row in the same batch samples from logits
no constraint touched. A matcher allows the end-of-sequence tokens only where its grammar accepts, and
says when nothing may follow (the object is closed): the sequence stops there.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from collections.abc import Sequence as Seq
from typing import Any

import torch

# Compact JSON: no free whitespace, so every generated token moves the object forward and a schema with
# bounded strings and arrays always closes within a bounded number of tokens.
JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_of(json_schema: dict | str) -> str:
    """The llguidance grammar of a JSON schema (a dict or its JSON text); a ValueError says what is wrong."""
    import llguidance

    schema = json.loads(json_schema) if isinstance(json_schema, str) else json_schema
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"the JSON schema cannot be used for constrained decoding: {messages[0]}")
    return grammar


class Grammars:
    """The engine's constrained decoding: matchers for requests, and masks filled beside each model step."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Seq[int]):
        self.tokenizer_json, self.vocab_size = tokenizer_json, vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.words = (vocab_size + 31) // 32  # int32 words of one row's bitmask
        self._tokenizer = None  # built at the first constrained request: it indexes the whole vocabulary
        self._grammars: dict[str, str] = {}  # schema text -> grammar: one compile per schema, not per row
        self._executor = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        self._shifts: dict[torch.device, torch.Tensor] = {}
        self.fill_seconds = 0.0  # time the background thread spent filling masks
        self.wait_seconds = 0.0  # time steps waited for masks after the model had run

    def matcher(self, json_schema: dict | str) -> Any:
        """A fresh matcher of `json_schema`; a ValueError if the schema cannot be constrained."""
        import llguidance

        key = json_schema if isinstance(json_schema, str) else json.dumps(json_schema, sort_keys=True)
        if key not in self._grammars:
            self._grammars[key] = grammar_of(json_schema)
        matcher = llguidance.LLMatcher(self._llg_tokenizer(), self._grammars[key], log_level=0)
        if matcher.is_error():
            raise ValueError(f"the JSON schema cannot be constrained: {matcher.get_error()}")
        return matcher

    def _llg_tokenizer(self):
        import llguidance

        if self._tokenizer is None:
            self._tokenizer = llguidance.LLTokenizer(
                self.tokenizer_json, n_vocab=self.vocab_size, eos_token=self.eos_token_ids
            )
            self._executor = llguidance.LLExecutor(num_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))
        return self._tokenizer

    def seconds(self) -> tuple[float, float]:
        """(filling masks, waiting for them) since the counters were last zeroed."""
        return self.fill_seconds, self.wait_seconds

    def start_masks(self, matchers: list[Any]) -> concurrent.futures.Future | None:
        """Begin filling the bitmasks of `matchers` (None where a row is unconstrained); None if none is."""
        rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return None
        return self._pool.submit(self._fill, rows, len(matchers))

    def _fill(self, rows: list[tuple[Any, int]], num_rows: int) -> tuple[torch.Tensor, list[int]]:
        started = time.perf_counter()
        masks = torch.zeros((num_rows, self.words), dtype=torch.int32)
        self._executor.unsafe_compute_mask_ptr(rows, masks.data_ptr(), self.words * 4, num_rows)
        self.fill_seconds += time.perf_counter() - started
        index = [i for _, i in rows]
        return masks[index], index

    @torch.inference_mode()  # the runner's logits are inference tensors
    def apply(self, logits: torch.Tensor, pending: concurrent.futures.Future) -> None:
        """Wait for the masks `start_masks` began; set to -inf what they forbid in their rows of `logits`."""
        started = time.perf_counter()
        masks, index = pending.result()
        self.wait_seconds += time.perf_counter() - started
        device = logits.device
        if device not in self._shifts:
            self._shifts[device] = torch.arange(32, dtype=torch.int32, device=device)
        bits = (masks.to(device, non_blocking=True).unsqueeze(-1) >> self._shifts[device]) & 1
        allowed = bits.reshape(len(index), -1)[:, : logits.shape[-1]].bool()
        rows = torch.tensor(index, device=device)
        logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def advance(matcher: Any, token: int) -> tuple[str | None, str | None]:
    """Feed a sampled token to its matcher: (finish reason, error) - ('stop', None) once nothing may follow,
    ('error', why) if the token broke the grammar, (None, None) to go on."""
    if not matcher.consume_token(token) or matcher.is_error():
        why = matcher.get_error() or "the grammar allowed no token"
        return "error", f"constrained decoding failed: {why}"
    if matcher.is_stopped():
        return "stop", None
    return None, None
