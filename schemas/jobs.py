"""Job specs: what a user writes in job.yaml, validated before any work starts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.records import CaptionFields

# qwen-vl-utils 0.0.14's video defaults (the official Qwen2-VL input pipeline), defined here once for the job
# specs and for model/pixels.py, which matches the reference with them. Budgets count merged tokens of
# 28 x 28 pixels: per frame between the min and max, and 90% of VIDEO_SEQ_LEN for all frames of a window.
VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768
VIDEO_MIN_TOKENS = 128  # per frame
VIDEO_MAX_TOKENS = 768  # per frame
VIDEO_SEQ_LEN = 128000  # qwen-vl-utils' MODEL_SEQ_LEN
VIDEO_MIN_PIXELS = VIDEO_MIN_TOKENS * 28 * 28
VIDEO_MAX_PIXELS = VIDEO_MAX_TOKENS * 28 * 28
VIDEO_TOTAL_PIXELS = int(VIDEO_SEQ_LEN * 28 * 28 * 0.9)

DEFAULT_CAPTION_PROMPT = "Describe this video in detail."
DEFAULT_OCR_PROMPT = (
    "Extract all text from this page as markdown, in reading order. "
    "Render tables as markdown tables. Output only the page's content."
)


def caption_json_prompt() -> str:
    """The default prompt of JSON captions; its keys come from `CaptionFields`, never written twice."""
    keys = ", ".join(f'"{name}"' for name in CaptionFields.model_fields)
    return (
        "Describe this video. Answer with one JSON object and nothing else, with the keys "
        f"{keys}: summary is a paragraph, the others are lists of short strings."
    )


class JobSpecError(ValueError):
    """A job spec that cannot be read or does not validate; the message names the file and the fields."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Sampling(Strict):
    """Generation settings; temperature 0 is greedy."""

    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0: no top-k filter
    seed: int = 0
    stop: list[str] = []


class Resources(Strict):
    """How many workers of each kind the job asks Ray for."""

    decode_workers: int = Field(2, ge=1)
    cpus_per_decode_worker: float = Field(1.0, gt=0.0)  # also the video decoder's threads (rounded up)
    gpu_workers: int = Field(1, ge=1)
    gpus_per_worker: float = Field(1.0, ge=0.0)  # 0 on CPU-only machines
    # Visual + prompt tokens of the rows sent to a GPU worker at once.
    max_batch_tokens: int = Field(16384, ge=1)


class Limits(Strict):
    """Safety limits and failure handling: inputs beyond a limit become error rows instead of exhausting a
    worker; crashed workers are retried a bounded number of times; a killed job loses little work."""

    decode_timeout_s: float = Field(
        600.0,
        gt=0.0,
        description="Seconds a decode may go without producing its next window / page before its process "
        "is killed and the item becomes an error row (ends hangs, including hangs inside C code).",
    )
    decode_retries: int = Field(
        2,
        ge=0,
        description="Times an item is retried after its decode process crashed (signal, os._exit, out of "
        "memory); after that the item becomes an error row. Windows / pages already decoded are kept.",
    )
    infer_retries: int = Field(
        3,
        ge=0,
        description="Times a batch is retried on a restarted GPU worker after its worker died; after that "
        "its items become error rows (stage pipeline) and the next run redoes them.",
    )
    max_pages_per_document: int = Field(
        2000,
        ge=1,
        description="Pages read from one document (after page_ranges); a longer document is an error row. "
        "Pages are streamed one at a time, so memory does not grow with this.",
    )
    max_video_seconds: float = Field(
        4 * 3600.0,
        gt=0.0,
        description="Longest video accepted, by its container's duration; a longer one is an error row.",
    )
    max_frames: int = Field(
        1_000_000,
        ge=1,
        description="Most frames in the source video (not the sampled ones); more is an error row.",
    )
    max_pixels: int = Field(
        89_478_485,
        ge=1,
        description="Most pixels of one source frame or image, checked before decoding it (Pillow's own "
        "decompression-bomb threshold); PDF pages are instead rendered at a scale that fits the job's "
        "max_pixels.",
    )
    commit_every_s: float = Field(
        120.0,
        gt=0.0,
        description="Finished items are committed to the output at least this often (and every "
        "rows_per_file rows): the most finished work a killed job loses.",
    )
    rows_per_file: int = Field(
        4096,
        ge=1,
        description="A Parquet file is committed once this many rows of whole items are ready (an item's "
        "rows are never split across files).",
    )


class JobBase(Strict):
    """What every job has: inputs, output, model, prompt, sampling, resources and limits."""

    job_id: str | None = None  # None: the runner derives one
    # Paths, globs, directories, manifest .txt files (one entry a line), s3:// gs:// URIs.
    inputs: list[str] = Field(min_length=1)
    output: str
    model: str  # checkpoint directory (Hugging Face layout)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    prompt: str | None = None  # None: the job kind's default
    system_prompt: str | None = None
    sampling: Sampling = Field(default_factory=Sampling)
    resources: Resources = Field(default_factory=Resources)
    limits: Limits = Field(default_factory=Limits)

    @field_validator("inputs")
    @classmethod
    def _no_blank_inputs(cls, inputs: list[str]) -> list[str]:
        if any(not s.strip() for s in inputs):
            raise ValueError("inputs must not contain empty strings")
        return inputs


class CaptionVideosJob(JobBase):
    """Caption every video, one caption per window of `clip_seconds` (the whole video when unset)."""

    kind: Literal["caption_videos"] = "caption_videos"
    fps: float = Field(VIDEO_FPS, gt=0.0)  # frames sampled per second of video
    min_frames: int = Field(VIDEO_MIN_FRAMES, ge=2)
    max_frames: int = Field(VIDEO_MAX_FRAMES, ge=2)  # per window
    min_pixels: int = Field(VIDEO_MIN_PIXELS, ge=28 * 28)  # per frame
    max_pixels: int = Field(VIDEO_MAX_PIXELS, ge=28 * 28)  # per frame
    total_pixels: int = Field(VIDEO_TOTAL_PIXELS, ge=28 * 28)  # all frames of one window
    clip_seconds: float | None = Field(None, gt=0.0)
    caption_format: Literal["text", "json"] = "text"  # json: the answer is parsed into CaptionFields

    @model_validator(mode="after")
    def _check(self) -> CaptionVideosJob:
        if self.min_frames > self.max_frames:
            raise ValueError(f"min_frames ({self.min_frames}) exceeds max_frames ({self.max_frames})")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")
        if self.prompt is None:
            prompt = caption_json_prompt() if self.caption_format == "json" else DEFAULT_CAPTION_PROMPT
            object.__setattr__(self, "prompt", prompt)
        return self


PAGE_RANGE = re.compile(r"^\s*(\d+)?\s*(-)?\s*(\d+)?\s*$")


def parse_page_ranges(spec: str) -> list[tuple[int, int | None]]:
    """'1-3,7,10-' -> [(1, 3), (7, 7), (10, None)]: 1-based inclusive ranges, None is the last page."""
    ranges = []
    for part in spec.split(","):
        m = PAGE_RANGE.match(part)
        if m is None or not (m.group(1) or m.group(3)) or (not m.group(2) and m.group(3)):
            raise ValueError(f"page range {part.strip()!r} is not N, N-M, N- or -M (pages count from 1)")
        first = int(m.group(1)) if m.group(1) else 1
        last = (int(m.group(3)) if m.group(3) else None) if m.group(2) else first
        if first < 1 or (last is not None and last < first):
            raise ValueError(f"page range {part.strip()!r} is empty or starts before page 1")
        ranges.append((first, last))
    return ranges


class OcrDocumentsJob(JobBase):
    """Transcribe every page of every document; images count as one-page documents."""

    kind: Literal["ocr_documents"] = "ocr_documents"
    target_longest_side: int | None = Field(None, ge=28)  # pixels; default 1288, as olmOCR renders
    dpi: float | None = Field(None, gt=0.0)  # instead of target_longest_side
    max_pixels: int = Field(28 * 28 * 16384, ge=28 * 28)  # render cap per page; the scale is lowered to fit
    page_ranges: str | None = None  # e.g. "1-3,7,10-"; None: every page
    keep_text_layer: bool = True

    @field_validator("page_ranges", mode="before")
    @classmethod
    def _valid_ranges(cls, spec: Any) -> Any:
        if isinstance(spec, int) and not isinstance(spec, bool):  # YAML reads `page_ranges: 5` as a number
            spec = str(spec)
        if isinstance(spec, str):
            parse_page_ranges(spec)
        return spec

    @model_validator(mode="after")
    def _check(self) -> OcrDocumentsJob:
        if self.dpi is not None and self.target_longest_side is not None:
            raise ValueError("set either dpi or target_longest_side, not both")
        if self.dpi is None and self.target_longest_side is None:
            object.__setattr__(self, "target_longest_side", 1288)
        if self.prompt is None:
            object.__setattr__(self, "prompt", DEFAULT_OCR_PROMPT)
        return self


JobSpec = Annotated[CaptionVideosJob | OcrDocumentsJob, Field(discriminator="kind")]
JOB_KINDS = ("caption_videos", "ocr_documents")
_ADAPTER: TypeAdapter[CaptionVideosJob | OcrDocumentsJob] = TypeAdapter(JobSpec)


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise JobSpecError(f"{source} {item!r}: write it as key=value, e.g. sampling.temperature=0.7")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise JobSpecError(f"{source} {item!r}: the value is not valid YAML ({e})") from e
        node: Any = data
        parts = key.strip().split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise JobSpecError(f"{source} {item!r}: {'.'.join(parts[: depth + 1])} is not an index")
                part = int(part)
            elif not isinstance(node, dict):
                raise JobSpecError(f"{source} {item!r}: {'.'.join(parts[:depth])} is not a mapping")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and not isinstance(node.get(part), dict | list):
                    node[part] = {}
                node = node[part]
    return data


def _describe(error: dict[str, Any]) -> str:
    loc = list(error["loc"])
    if loc and loc[0] in JOB_KINDS:  # the discriminated union puts the chosen kind first
        loc = loc[1:]
    where = ".".join(str(p) for p in loc) or "(top level)"
    if error["type"] == "union_tag_not_found":
        return f"kind: missing; set kind to one of {', '.join(JOB_KINDS)}"
    if error["type"] == "union_tag_invalid":
        return f"kind: {error['input'].get('kind')!r} is not a job kind; use one of {', '.join(JOB_KINDS)}"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key (check the spelling; see the job spec reference)"
    return f"{where}: {error['msg']}"


def validate_job(data: Any, source: str = "<job spec>") -> CaptionVideosJob | OcrDocumentsJob:
    """A job from a parsed mapping; every error is reported with its field path and `source`."""
    if not isinstance(data, dict):
        raise JobSpecError(f"{source}: a job spec is a mapping of keys (kind, inputs, output, model, ...)")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        lines = "\n".join(f"  {_describe(err)}" for err in e.errors())
        raise JobSpecError(f"{source}: invalid job spec ({e.error_count()} error(s)):\n{lines}") from None


def load_job(path: str | Path, overrides: list[str] | None = None) -> CaptionVideosJob | OcrDocumentsJob:
    """Read a YAML job spec, apply `--set key=value` overrides, validate; `kind:` picks the job model."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise JobSpecError(f"{path}: cannot read the job spec ({e.strerror})") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise JobSpecError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        data = {}
    if overrides:
        if not isinstance(data, dict):
            raise JobSpecError(f"{path}: a job spec is a mapping of keys (kind, inputs, output, model, ...)")
        apply_overrides(data, overrides, source=f"{path}: --set")
    return validate_job(data, source=str(path))
