"""`vlbatch plan`: what a job will cost, from metadata only (durations, fps, page counts, sizes).

No model is loaded and no frame or page is decoded: windows and frame picks come from the same functions
the decode stage uses, sizes from headers, token counts from the same prompt the prepare stage counts.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from pipeline import storage
from pipeline.budget import GpuLayout, gpu_layout, model_context
from pipeline.prepare import messages_for, visual_item
from pipeline.rows import error_message
from pipeline.sources import Item, expand_inputs
from pipeline.tasks import decode_config, task_of
from pipeline.writer import scan_output
from schemas import JobBase

MAX_LISTED_PROBLEMS = 50


@dataclass
class ItemPlan:
    uri: str
    item_id: str
    units: int = 0  # windows or pages
    frames: int = 0  # sampled frames (videos) or pages (documents) the model sees
    visual_tokens: int = 0
    prompt_tokens: int = 0  # text tokens of the prompts, chat template included
    problem: str | None = None  # what makes the item an error row instead
    largest_unit_tokens: int = 0  # visual + prompt tokens of its largest window / page

    def add_unit(self, processor, job, shape: list[int], frames: int) -> None:
        """Count one window / page of `shape`, `frames` of it seen, as the prepare stage will (the model's
        resize included)."""
        resized = [*processor.image_processor.resized_size(shape[-3], shape[-2]), 3]
        count = processor.count_tokens(
            messages_for(visual_item([*shape[:-3], *resized]), job.prompt, job.system_prompt)
        )
        self.units += 1
        self.frames += frames
        self.visual_tokens += count.visual_tokens
        self.prompt_tokens += count.text_tokens
        self.largest_unit_tokens = max(self.largest_unit_tokens, count.num_tokens)


@dataclass
class Plan:
    kind: str
    unit: str
    max_new_tokens: int
    items: list[ItemPlan] = field(default_factory=list)
    done_item_ids: set[str] = field(default_factory=set)  # already ok in the output: a run skips them
    context: int = 0  # tokens one unit's sequence may hold
    gpu: GpuLayout | None = None  # weights and KV cache per GPU of an inference worker

    def largest_unit(self) -> int:
        """Visual + prompt tokens + max_new_tokens of the largest window / page."""
        return max((p.largest_unit_tokens for p in self.items), default=0) + self.max_new_tokens

    def totals(self, remaining: bool = False) -> dict[str, int]:
        chosen = [p for p in self.items if not (remaining and p.item_id in self.done_item_ids)]
        units = sum(p.units for p in chosen)
        visual = sum(p.visual_tokens for p in chosen)
        prompt = sum(p.prompt_tokens for p in chosen)
        return {
            "items": len(chosen),
            "problem_items": sum(p.problem is not None for p in chosen),
            self.unit: units,
            "frames": sum(p.frames for p in chosen),
            "visual_tokens": visual,
            "prompt_tokens": prompt,
            "input_tokens": visual + prompt,
            "max_generated_tokens": units * self.max_new_tokens,
            "max_model_tokens": visual + prompt + units * self.max_new_tokens,
        }

    def to_json(self) -> str:
        problems = [asdict(p) for p in self.items if p.problem][:MAX_LISTED_PROBLEMS]
        return json.dumps(
            {
                "kind": self.kind,
                "context": self.context,
                "largest_unit_tokens": self.largest_unit(),
                "total": self.totals(),
                "remaining": self.totals(remaining=True),
                "problems": problems,
                "gpu": self._gpu_json(),
            },
            indent=2,
        )

    def _gpu_json(self) -> dict | None:
        if self.gpu is None:
            return None
        g = self.gpu
        return {
            "tensor_parallel_size": g.tensor_parallel_size,
            "weights_bytes_per_gpu": g.weights_bytes,
            "gpu_bytes": g.gpu_bytes,
            "gpu_source": g.gpu_source,
            "kv_cache_tokens": g.kv_tokens,
            "problem": g.problem(),
        }

    def describe(self) -> str:
        t, left = self.totals(), self.totals(remaining=True)
        lines = [
            f"plan of {self.kind} (metadata only, no model loaded)",
            f"  items              {t['items']:>14,}   ({t['problem_items']} would be error rows)",
            f"  {self.unit:<18} {t[self.unit]:>14,}",
        ]
        if self.unit == "windows":
            lines.append(f"  frames             {t['frames']:>14,}")
        lines += [
            f"  visual tokens      {t['visual_tokens']:>14,}",
            f"  prompt tokens      {t['prompt_tokens']:>14,}   (text, chat template included)",
            f"  model tokens       {t['max_model_tokens']:>14,}   (input {t['input_tokens']:,} + at most "
            f"{t['max_generated_tokens']:,} generated, {self.max_new_tokens} per {self.unit[:-1]})",
        ]
        share = self.largest_unit() / self.context if self.context else 0.0
        lines.append(
            f"  model context      {self.context:>14,}   tokens per {self.unit[:-1]}; the largest takes "
            f"{self.largest_unit():,} ({share:.0%}) with max_new_tokens"
        )
        if self.gpu is not None:
            lines += self.gpu.describe()
            if self.gpu.problem():
                lines.append(f"  does not fit: {self.gpu.problem()}")
        if self.done_item_ids:
            lines.append(
                f"  already done       {t['items'] - left['items']:>14,}   items; the run will cost "
                f"{left['max_model_tokens']:,} model tokens"
            )
        for p in [p for p in self.items if p.problem][:MAX_LISTED_PROBLEMS]:
            lines.append(f"  problem: {p.problem}")
        return "\n".join(lines)


@storage.with_job_storage
def plan_job(job: JobBase, threads: int = 8) -> Plan:
    """The plan of every input; an item that cannot be read counts as one error row, as in a run."""
    from model.processor import Processor

    task = task_of(job)
    items = expand_inputs(job.inputs, task.inputs)
    processor = Processor.from_pretrained(job.model)  # tokenizer and preprocessor config only
    cfg = decode_config(job, processor)  # what the decode stage gets: the same windows, sizes and errors

    def plan_one(item: Item) -> ItemPlan:
        try:
            plan = ItemPlan(item.uri, item.item_id)
            for shape, frames in task.unit_shapes(item.uri, cfg):
                plan.add_unit(processor, job, shape, frames)
            return plan
        except Exception as e:
            return ItemPlan(item.uri, item.item_id, units=1, problem=error_message(item.uri, e))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        plans = list(pool.map(plan_one, items))
    done = scan_output(job.output, uri_key="uri").ok_items  # an output not there yet holds nothing
    context = model_context(job.model, job.max_model_len)
    gpu = gpu_layout(job)
    return Plan(job.kind, task.unit, job.sampling.max_new_tokens, plans, done, context, gpu)
