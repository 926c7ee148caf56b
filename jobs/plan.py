"""`vlbatch plan`: what a job will cost, from metadata only (durations, fps, page counts, sizes).

No model is loaded and no frame or page is decoded: windows and frame picks come from the same functions
the decode stage uses, sizes from headers, token counts from the same prompt the prepare stage counts.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline import storage
from pipeline.prepare import messages_for, visual_item
from pipeline.sources import Item, expand_inputs
from pipeline.writer import scan_output
from schemas import CaptionVideosJob, OcrDocumentsJob

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


@dataclass
class Plan:
    kind: str
    unit: str
    max_new_tokens: int
    items: list[ItemPlan] = field(default_factory=list)
    done_item_ids: set[str] = field(default_factory=set)  # already ok in the output: a run skips them

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
        if self.done_item_ids:
            lines.append(
                f"  already done       {t['items'] - left['items']:>14,}   items; the run will cost "
                f"{left['max_model_tokens']:,} model tokens"
            )
        for p in [p for p in self.items if p.problem][:MAX_LISTED_PROBLEMS]:
            lines.append(f"  problem: {p.problem}")
        return "\n".join(lines)


def _video_plan(item: Item, job: CaptionVideosJob, processor) -> ItemPlan:
    from pipeline.video import VideoDecodeConfig, check_limits, plan_windows, probe_video

    plan = ItemPlan(item.uri, item.item_id)
    cfg = VideoDecodeConfig.from_job(job)
    info = probe_video(item.uri, count_frames=True)  # demuxes packets to count frames; decodes nothing
    check_limits(info, cfg)
    for window in plan_windows(info, cfg):
        shape = [
            len(window.frame_indices),
            *processor.image_processor.resized_size(window.height, window.width),
            3,
        ]
        count = processor.count_tokens(messages_for(visual_item(shape), job.prompt, job.system_prompt))
        plan.units += 1
        plan.frames += shape[0]
        plan.visual_tokens += count.visual_tokens
        plan.prompt_tokens += count.text_tokens
    return plan


def image_render_size(width: int, height: int, job: OcrDocumentsJob) -> tuple[int, int]:
    """(height, width) the document stage gives a raster image: downscaled to the target side, capped."""
    scale = 1.0
    if job.dpi is None and job.target_longest_side is not None:
        scale = min(1.0, job.target_longest_side / max(width, height))
    if (width * scale) * (height * scale) > job.max_pixels:
        scale = math.sqrt(job.max_pixels / (width * height))
    if scale < 1.0:
        return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))
    return height, width


def _page_sizes(item: Item, job: OcrDocumentsJob) -> list[tuple[int, int]]:
    """Rendered (height, width) of each selected page, from page boxes or image headers."""
    import pymupdf
    from PIL import Image

    from pipeline.documents import IMAGE_EXTENSIONS, DocumentConfig, _open_pdf, render_scale, select_pages
    from pipeline.media import DecodeError, local_file

    cfg = DocumentConfig.from_job(job)
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
            return [image_render_size(width, height, job)]
        with _open_pdf(path, item.uri) as doc:
            pages = select_pages(cfg.page_ranges, doc.page_count)
            if not pages or len(pages) > cfg.max_pages:
                raise DecodeError(f"{item.uri}: {len(pages)} pages selected (limit {cfg.max_pages})")
            sizes = []
            for index in pages:
                rect = doc.load_page(index).rect
                scale = render_scale(
                    rect.width, rect.height, cfg.target_longest_side, cfg.dpi, cfg.max_pixels
                )
                box = (rect * pymupdf.Matrix(scale, scale)).irect  # the pixel box get_pixmap renders
                sizes.append((box.height, box.width))
            return sizes


def _document_plan(item: Item, job: OcrDocumentsJob, processor) -> ItemPlan:
    plan = ItemPlan(item.uri, item.item_id)
    for height, width in _page_sizes(item, job):
        shape = [*processor.image_processor.resized_size(height, width), 3]
        count = processor.count_tokens(messages_for(visual_item(shape), job.prompt, job.system_prompt))
        plan.units += 1
        plan.frames += 1
        plan.visual_tokens += count.visual_tokens
        plan.prompt_tokens += count.text_tokens
    return plan


@storage.with_job_storage
def plan_job(job: CaptionVideosJob | OcrDocumentsJob, threads: int = 8) -> Plan:
    """The plan of every input; an item that cannot be read counts as one error row, as in a run."""
    from model.processor import Processor

    video = isinstance(job, CaptionVideosJob)
    items = expand_inputs(job.inputs, "video" if video else "document")
    processor = Processor.from_pretrained(job.model)  # tokenizer and preprocessor config only
    plan_one = _video_plan if video else _document_plan

    def safe(item: Item) -> ItemPlan:
        try:
            return plan_one(item, job, processor)
        except Exception as e:
            message = str(e) if item.uri in str(e) else f"{item.uri}: {e}"
            return ItemPlan(item.uri, item.item_id, units=1, problem=message)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        plans = list(pool.map(safe, items))
    done = scan_output(job.output, uri_key="uri").ok_items  # an output not there yet holds nothing
    return Plan(job.kind, "windows" if video else "pages", job.sampling.max_new_tokens, plans, done)
