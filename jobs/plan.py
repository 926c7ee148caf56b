"""`vlbatch plan`: what a job will cost, from metadata only (durations, fps, page counts, sizes).

No model is loaded and no frame or page is decoded: windows and frame picks come from the same functions
the decode stage uses, sizes from headers, token counts from the same prompt the prepare stage counts.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline import storage
from pipeline.budget import model_context
from pipeline.job import decode_config
from pipeline.media import error_row
from pipeline.prepare import messages_for, visual_item
from pipeline.sources import Item, expand_inputs
from pipeline.writer import scan_output
from schemas import CaptionVideosJob, OcrDocumentsJob

MAX_LISTED_PROBLEMS = 50


def error_message(uri: str, error: BaseException) -> str:
    """The error_message the run's error row for this item would carry."""
    return error_row({"uri": uri}, "decode", error)["error_message"]


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

    def add_unit(self, processor, job, shape: list[int], frames: int | None = None) -> None:
        """Count one window / page of `shape` as the prepare stage will (the model's resize included)."""
        resized = [*processor.image_processor.resized_size(shape[-3], shape[-2]), 3]
        count = processor.count_tokens(
            messages_for(visual_item([*shape[:-3], *resized]), job.prompt, job.system_prompt)
        )
        self.units += 1
        self.frames += frames if frames is not None else (shape[0] if len(shape) == 4 else 1)
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
            },
            indent=2,
        )

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
        if self.done_item_ids:
            lines.append(
                f"  already done       {t['items'] - left['items']:>14,}   items; the run will cost "
                f"{left['max_model_tokens']:,} model tokens"
            )
        for p in [p for p in self.items if p.problem][:MAX_LISTED_PROBLEMS]:
            lines.append(f"  problem: {p.problem}")
        return "\n".join(lines)


def _video_plan(item: Item, job: CaptionVideosJob, processor, cfg) -> ItemPlan:
    from pipeline.video import check_limits, plan_windows, probe_video

    plan = ItemPlan(item.uri, item.item_id)
    info = probe_video(item.uri, count_frames=True)  # demuxes packets to count frames; decodes nothing
    check_limits(info, cfg)
    for window in plan_windows(info, cfg):
        shape = [len(window.frame_indices), window.height, window.width, 3]
        plan.add_unit(processor, job, shape, frames=1 if window.end_frame - window.start_frame == 1 else None)
    return plan


def _page_sizes(item: Item, cfg) -> list[tuple[int, int]]:
    """Rendered (height, width) of each selected page, from page boxes or image headers."""
    import pymupdf
    from PIL import Image

    from pipeline.documents import IMAGE_EXTENSIONS, _open_pdf, image_target_size, page_scale, select_pages
    from pipeline.media import DecodeError, local_file

    with local_file(item.uri) as path:
        if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
            try:
                with Image.open(path) as image:
                    width, height = image.size
                    if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotation by 90 degrees
                        width, height = height, width
            except (OSError, SyntaxError, ValueError) as e:
                raise DecodeError(f"{item.uri}: not a readable image ({e})") from e
            if width * height > cfg.max_source_pixels:
                raise DecodeError(f"{item.uri}: image of {width}x{height} exceeds limits.max_pixels")
            return [image_target_size(width, height, cfg, item.uri)]
        with _open_pdf(path, item.uri) as doc:
            pages = select_pages(cfg.page_ranges, doc.page_count)
            if not pages or len(pages) > cfg.max_pages:
                raise DecodeError(f"{item.uri}: {len(pages)} pages selected (limit {cfg.max_pages})")
            sizes = []
            for index in pages:
                rect = doc.load_page(index).rect
                scale = page_scale(rect.width, rect.height, cfg, item.uri)
                box = (rect * pymupdf.Matrix(scale, scale)).irect  # the pixel box get_pixmap renders
                sizes.append((box.height, box.width))
            return sizes


def _document_plan(item: Item, job: OcrDocumentsJob, processor, cfg) -> ItemPlan:
    plan = ItemPlan(item.uri, item.item_id)
    for height, width in _page_sizes(item, cfg):
        plan.add_unit(processor, job, [height, width, 3])
    return plan


@storage.with_job_storage
def plan_job(job: CaptionVideosJob | OcrDocumentsJob, threads: int = 8) -> Plan:
    """The plan of every input; an item that cannot be read counts as one error row, as in a run."""
    from model.processor import Processor

    video = isinstance(job, CaptionVideosJob)
    items = expand_inputs(job.inputs, "video" if video else "document")
    processor = Processor.from_pretrained(job.model)  # tokenizer and preprocessor config only
    cfg = decode_config(job, processor)  # what the decode stage gets: the same windows, sizes and errors
    plan_one = _video_plan if video else _document_plan

    def safe(item: Item) -> ItemPlan:
        try:
            return plan_one(item, job, processor, cfg)
        except Exception as e:
            return ItemPlan(item.uri, item.item_id, units=1, problem=error_message(item.uri, e))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        plans = list(pool.map(safe, items))
    done = scan_output(job.output, uri_key="uri").ok_items  # an output not there yet holds nothing
    context = model_context(job.model, job.max_model_len)
    unit = "windows" if video else "pages"
    return Plan(job.kind, unit, job.sampling.max_new_tokens, plans, done, context)
