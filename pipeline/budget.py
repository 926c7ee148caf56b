"""How many visual tokens one unit may take: the model's context less the prompt's text and the answer.

The decode stage sizes every video window and page under this budget, `vlbatch plan` counts with the same
numbers, and the GPU stage's engine is built with the same context, so a unit that leaves decode always
fits the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from schemas import CaptionVideosJob, OcrDocumentsJob


@dataclass(frozen=True)
class TokenBudget:
    """One unit's sequence: `text_tokens` of prompt, visual tokens, then up to `max_new_tokens` generated."""

    context: int  # tokens one sequence may hold (prompt + generated)
    text_tokens: int  # the prompt's text tokens, chat template included
    max_new_tokens: int

    @property
    def visual_tokens(self) -> int:
        """The most visual tokens a unit may have (may be <= 0: then nothing fits)."""
        return self.context - self.text_tokens - self.max_new_tokens

    def describe(self) -> str:
        return (
            f"the model's context of {self.context:,} tokens leaves {self.visual_tokens:,} for visual tokens "
            f"after the prompt's {self.text_tokens} text tokens and sampling.max_new_tokens="
            f"{self.max_new_tokens}"
        )


def model_context(model_path: str | Path, max_model_len: int | None = None) -> int:
    """The job's `max_model_len`, else the checkpoint's `max_position_embeddings` (config.json)."""
    if max_model_len is not None:
        return max_model_len
    path = Path(model_path) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the model's config ({e}); --model must be a checkpoint") from e
    text = config.get("text_config") or {}  # newer exports nest the language model's settings
    value = config.get("max_position_embeddings", text.get("max_position_embeddings"))
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: no max_position_embeddings; set max_model_len in the job spec")
    return value


def token_budget(job: CaptionVideosJob | OcrDocumentsJob, processor=None) -> TokenBudget:
    """The budget of every unit of `job` (its prompt is the same for every unit, so is its text)."""
    from model.processor import Processor
    from pipeline.prepare import messages_for, visual_item
    from pipeline.tasks import task_of

    processor = processor or Processor.from_pretrained(job.model)
    shape = list(task_of(job).sample_shape)
    prompt = processor.count_tokens(messages_for(visual_item(shape), job.prompt, job.system_prompt))
    context = model_context(job.model, job.max_model_len)
    return TokenBudget(context, prompt.text_tokens, job.sampling.max_new_tokens)
