"""Job specs: what a user writes in job.yaml, validated before any work starts.

One module past 400 lines on purpose: every key of a job, its default and its description live here and
nowhere else (the spec reference, docs/job_spec.md, is generated from it), with the loader that reports
errors against the same fields.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
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
DEFAULT_CLIP_SECONDS = 120.0

# Pages: olmOCR's render size, and a cap of 16,384 merged tokens' worth of pixels.
PAGE_LONGEST_SIDE = 1288
PAGE_MAX_PIXELS = 28 * 28 * 16384

# Limits on inputs (the job's `limits`); the decode stage's own defaults come from these too.
MAX_VIDEO_SECONDS = 4 * 3600.0
MAX_SOURCE_FRAMES = 1_000_000
MAX_SOURCE_PIXELS = 89_478_485  # Pillow's decompression-bomb threshold
MAX_PAGES_PER_DOCUMENT = 2000
# The GPU stage's budgets (the job's `resources`).
MAX_PACK_TOKENS = 16384  # visual + prompt tokens one pack carries to a worker
MAX_STEP_TOKENS = 16384  # tokens an engine step computes
MAX_SEQS_IN_FLIGHT = 256  # sequences one engine holds
MAX_PACKS_IN_FLIGHT = 4  # packs a worker takes at once

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


def json_answer_prompt(instruction: str, schema: dict[str, Any]) -> str:
    """A prompt asking for one JSON object of a user's schema, its keys (and their descriptions) named."""
    from schemas.fields_schema import schema_keys

    props = schema.get("properties", {})
    keys = ", ".join(
        f'"{k}" ({props[k]["description"]})'
        if isinstance(props.get(k), dict) and props[k].get("description")
        else f'"{k}"'
        for k in schema_keys(schema)
    )
    return f"{instruction} Answer with one JSON object and nothing else, with the keys {keys}."


def _fields_schema(value: Any, info: ValidationInfo) -> Any:
    """A fields schema (inline, JSON text or a file's path) loaded and checked at job start: whatever cannot
    become a typed column or a grammar is refused here, named, never met mid-run."""
    if value is None:
        return None
    from model.engine.grammar import grammar_of
    from schemas.fields_schema import fields_model, load_fields_schema

    schema = load_fields_schema(value, info.field_name)
    fields_model(schema, info.field_name)
    grammar_of(schema)
    return schema


FieldsSchema = Annotated[dict[str, Any] | None, BeforeValidator(_fields_schema)]


class JobSpecError(ValueError):
    """A job spec that cannot be read or does not validate; the message names the file and the fields."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Sampling(Strict):
    """Generation settings; temperature 0 is greedy."""

    max_new_tokens: int = Field(512, ge=1, description="Most tokens generated per window / page.")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling: keep the most likely tokens "
        "whose probabilities sum to top_p; 1 keeps all.",
    )
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens; 0: no top-k filter.")
    seed: int = Field(0, description="Seed of the sampler (with temperature > 0).")
    stop: list[str] = Field([], description="Strings that end a generation when produced (not kept).")


class Resources(Strict):
    """How many workers of each kind the job asks Ray for."""

    decode_workers: int = Field(2, ge=1, description="CPU actors that decode videos / render pages.")
    cpus_per_decode_worker: float = Field(
        1.0,
        gt=0.0,
        description="CPUs each decode worker asks for; also the video decoder's threads (rounded up).",
    )
    gpu_workers: int = Field(1, ge=1, description="Inference actors, each holding the model once.")
    gpus_per_worker: float = Field(
        1.0,
        ge=0.0,
        description="GPUs per inference actor: a fraction shares a GPU; a whole number N > 1 shards the "
        "language model over N GPUs of one node (tensor parallel, one process each). On a machine "
        "without GPUs (or device: cpu) a fraction is ignored and N > 1 runs the N ranks on the CPU.",
    )
    cpus_per_gpu_worker: float | None = Field(
        None,
        gt=0.0,
        description="CPUs each inference actor asks for; on a machine without GPUs also the torch threads it "
        "computes with (at most the node's cores). null: 0.5 where the cluster has GPUs; on a CPU-only "
        "cluster what the decode workers and the light stages leave, shared among gpu_workers, at most "
        "the node's cores.",
    )
    gpu_memory_gb: float | None = Field(
        None,
        gt=0.0,
        description="Memory of each GPU, for `vlbatch plan`'s fit check (weights per GPU, KV-cache room); "
        "null: the GPU this machine has, or no check where it has none.",
    )
    max_pack_tokens: int = Field(
        MAX_PACK_TOKENS,
        ge=1,
        validation_alias=AliasChoices("max_pack_tokens", "max_batch_tokens"),
        description="Visual + prompt tokens of the rows one pack carries to an inference worker (a unit "
        "larger than this travels alone). Also accepted as max_batch_tokens, its old name.",
    )
    max_step_tokens: int = Field(
        MAX_STEP_TOKENS,
        ge=256,
        description="Tokens the engine computes per step (prefill chunks + one per decoding sequence).",
    )
    max_seqs_in_flight: int = Field(
        MAX_SEQS_IN_FLIGHT,
        ge=1,
        description="Sequences an inference worker's engine holds at once (each with its KV cache).",
    )
    max_packs_in_flight: int = Field(
        MAX_PACKS_IN_FLIGHT,
        ge=1,
        description="Packs a worker takes at once: new rows join the engine while earlier ones still "
        "decode, so it stays full across pack edges. 1: each pack drains before the next.",
    )
    max_waiting_bytes: int | None = Field(
        None,
        ge=1,
        description="Bytes of model-ready pixel values that may wait in a worker's engine for a free slot; "
        "the rest of the packs in flight wait as uint8. null: 2% of the GPU's memory, 512 MiB on CPU.",
    )


    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_when_sharded(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError(
                f"gpus_per_worker: {value}: more than one GPU per worker means tensor parallelism over whole "
                f"GPUs; use {int(value)} or {int(value) + 1}, or a fraction up to 1 to share a GPU"
            )
        return value

    @property
    def tensor_parallel_size(self) -> int:
        """Ranks the language model of each inference worker is sharded over."""
        return int(self.gpus_per_worker) if self.gpus_per_worker > 1 else 1


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
        description="Times a batch is started again on a restarted GPU worker after its worker died; after "
        "that its items are run again in a further pass (lost_item_passes) or become error rows (stage "
        "pipeline) that the next run redoes.",
    )
    lost_item_passes: int = Field(
        1,
        ge=0,
        description="Items whose results never all reached the driver (a node lost with their blocks, a "
        "batch whose retries ran out) are run again, in the same job, up to this many more times before "
        "they become error rows.",
    )
    no_progress_timeout_s: float = Field(
        900.0,
        gt=0.0,
        description="Seconds the job may go without any stage taking or producing a block (a lost node whose "
        "resources never return, a hung worker) before it stops with an error; what was written is kept and "
        "a rerun goes on from there. It must exceed the GPU stage's model load and the time a new node "
        "takes to join.",
    )
    max_pages_per_document: int = Field(
        MAX_PAGES_PER_DOCUMENT,
        ge=1,
        description="Pages read from one document (after page_ranges); a longer document is an error row. "
        "Pages are streamed one at a time, so memory does not grow with this.",
    )
    max_video_seconds: float = Field(
        MAX_VIDEO_SECONDS,
        gt=0.0,
        description="Longest video accepted, by its container's duration; a longer one is an error row.",
    )
    max_frames: int = Field(
        MAX_SOURCE_FRAMES,
        ge=1,
        description="Most frames in the source video (not the sampled ones); more is an error row.",
    )
    max_pixels: int = Field(
        MAX_SOURCE_PIXELS,
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


class Storage(Strict):
    """Object storage (s3://, gs://) settings that are not secrets; credentials come from the standard AWS or
    Google environment and config chain, never from the spec."""

    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint (MinIO, Ceph, R2), e.g. http://127.0.0.1:9000; overrides the "
        "AWS_ENDPOINT_URL environment variable. None: AWS_ENDPOINT_URL, else AWS's own endpoint.",
    )
    region: str | None = Field(
        None, description="S3 region; None: AWS_REGION / AWS_DEFAULT_REGION, else the SDK's default."
    )

    @field_validator("endpoint_url")
    @classmethod
    def _plain_endpoint(cls, url: str | None) -> str | None:
        if url is None:
            return None
        if not re.fullmatch(r"https?://[^/@\s]+(/[^@\s]*)?", url):
            raise ValueError(
                f"endpoint_url {url!r}: give http(s)://host[:port], without credentials (they are read "
                "from the environment)"
            )
        return url.rstrip("/")


class JobBase(Strict):
    """What every job has: inputs, output, model, prompt, sampling, resources and limits."""

    job_id: str | None = Field(
        None,
        description="Name of the run in the output's rows and manifest; null: the runner derives "
        "one from the kind and the time.",
    )
    inputs: list[str] = Field(
        min_length=1,
        description="Paths, globs, directories, manifest .txt files (one entry a line), "
        "s3:// and gs:// URIs.",
    )
    output: str = Field(
        description="Output directory (local or s3:// gs://): Parquet files + _manifest.json."
    )
    model: str = Field(
        description="Checkpoint directory (Hugging Face layout: config.json, safetensors, tokenizer.json)."
    )
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Weights and activations of the model."
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: the GPUs where the cluster has them, else the CPU."
    )
    max_model_len: int | None = Field(
        None,
        ge=64,
        description="Tokens one unit's sequence may hold (visual + prompt + generated); default the "
        "checkpoint's max_position_embeddings (32,768 for Qwen2-VL). Video windows and pages are sized so "
        "that visual + prompt tokens + sampling.max_new_tokens fit it.",
    )
    prompt: str | None = Field(
        None, description="The instruction given with each window / page; null: the job kind's default."
    )
    system_prompt: str | None = Field(None, description="A system message before the prompt; null: none.")
    sampling: Sampling = Field(default_factory=Sampling, description="Generation settings (below).")
    resources: Resources = Field(default_factory=Resources, description="Workers asked of Ray (below).")
    limits: Limits = Field(default_factory=Limits, description="Safety limits and retries (below).")
    storage: Storage = Field(default_factory=Storage, description="Object-storage endpoint and region.")

    @field_validator("inputs")
    @classmethod
    def _no_blank_inputs(cls, inputs: list[str]) -> list[str]:
        if any(not s.strip() for s in inputs):
            raise ValueError("inputs must not contain empty strings")
        return inputs


class CaptionVideosJob(JobBase):
    """Caption every video, one caption per window of `clip_seconds` (the whole video when unset)."""

    kind: Literal["caption_videos"] = "caption_videos"
    fps: float = Field(
        VIDEO_FPS,
        gt=0.0,
        description="Frames sampled per second of video (a target: a window whose frames would not fit the "
        "model's context gets fewer, evenly spread; the row's sample_fps says what was applied).",
    )
    min_frames: int = Field(
        VIDEO_MIN_FRAMES,
        ge=2,
        description="Fewest frames sampled from a window. Set explicitly, it is a floor the context fit "
        "keeps (a window that cannot fit with it is an error row naming the value that would).",
    )
    max_frames: int = Field(VIDEO_MAX_FRAMES, ge=2, description="Most frames sampled from one window.")
    min_pixels: int = Field(
        VIDEO_MIN_PIXELS,
        ge=28 * 28,
        description="Fewest pixels of a sampled frame; the context fit lowers frame sizes down to this, then "
        "takes fewer frames. Set explicitly, it is a floor like min_frames.",
    )
    max_pixels: int = Field(VIDEO_MAX_PIXELS, ge=28 * 28, description="Most pixels of a sampled frame.")
    total_pixels: int = Field(
        VIDEO_TOTAL_PIXELS,
        ge=28 * 28,
        description="Most pixels of all sampled frames of one window (qwen-vl-utils' rule, made for "
        "128k-token models); the model's context lowers it further where it must.",
    )
    clip_seconds: float | None = Field(
        DEFAULT_CLIP_SECONDS,
        gt=0.0,
        description="Window length: one caption per clip_seconds of video (a tail shorter than min_frames "
        "joins the window before it); null: the whole video in one window. The default, 2 minutes, gives "
        "240 frames at 2 fps, which fill Qwen2-VL's 32k context at about 270 visual tokens per frame pair "
        "(about 530x400 pixels at 4:3): a caption with timestamps every 2 minutes at a frame size that still "
        "shows detail (cosmos-curate's 256-frame windows are the same size). Longer windows shrink frames; "
        "shorter ones cost more tokens per minute of video.",
    )
    caption_format: Literal["text", "json"] = Field(
        "text",
        description="json: captions are generated under a JSON schema (constrained decoding, so every "
        "caption parses) into the typed `fields` column; the built-in schema is summary, objects, actions, "
        "on_screen_text, unless caption_schema gives one.",
    )
    caption_schema: FieldsSchema = Field(
        None,
        description="Your own JSON schema of a caption (inline, or a .json/.yaml file's path): objects, "
        "arrays, enums, strings, numbers, booleans, nesting. Implies caption_format json; `fields` becomes "
        "a Parquet struct of exactly these keys and types.",
    )

    @model_validator(mode="after")
    def _check(self) -> CaptionVideosJob:
        if self.min_frames > self.max_frames:
            raise ValueError(f"min_frames ({self.min_frames}) exceeds max_frames ({self.max_frames})")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")
        if self.caption_schema is not None:
            if "caption_format" in self.model_fields_set and self.caption_format != "json":
                raise ValueError("caption_schema makes JSON captions: drop caption_format: text")
            object.__setattr__(self, "caption_format", "json")
        if self.prompt is None:
            if self.caption_schema is not None:
                prompt = json_answer_prompt("Describe this video.", self.caption_schema)
            else:
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
    target_longest_side: int | None = Field(
        None,
        ge=28,
        description=f"Pixels of a rendered page's longest side; null (and no dpi): {PAGE_LONGEST_SIDE}, "
        "as olmOCR renders. Images are only ever scaled down to it.",
    )
    dpi: float | None = Field(
        None, gt=0.0, description="Render PDF pages at this DPI instead of target_longest_side."
    )
    max_pixels: int = Field(
        PAGE_MAX_PIXELS, ge=28 * 28, description="Render cap per page; the scale is lowered to fit."
    )
    page_ranges: str | None = Field(
        None, description='Pages to read, 1-based, e.g. "1-3,7,10-"; null: every page.'
    )
    keep_text_layer: bool = Field(True, description="Keep each page's own text layer in `text_layer`.")
    page_schema: FieldsSchema = Field(
        None,
        description="A JSON schema of what to read from each page (inline, or a .json/.yaml file's path), "
        "e.g. olmOCR's language, rotation, is_table and natural_text: pages are generated under it "
        "(constrained decoding) into a typed `fields` column, and `text` holds the JSON as written.",
    )

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
            object.__setattr__(self, "target_longest_side", PAGE_LONGEST_SIDE)
        if self.prompt is None:
            prompt = DEFAULT_OCR_PROMPT
            if self.page_schema is not None:
                prompt = json_answer_prompt("Read this page.", self.page_schema)
            object.__setattr__(self, "prompt", prompt)
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


def _keys_beside(loc: tuple) -> list[str]:
    """The keys the model allows where an unknown key `loc` was written (loc starts with the job kind)."""
    model: Any = {"caption_videos": CaptionVideosJob, "ocr_documents": OcrDocumentsJob}.get(loc[0])
    for part in loc[1:-1]:
        info = model.model_fields.get(part) if model is not None else None
        model = info.annotation if info is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return list(model.model_fields) if model is not None else []


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
        guess = difflib.get_close_matches(str(loc[-1]), _keys_beside(error["loc"]), n=1) if loc else []
        hint = f"did you mean {'.'.join([*map(str, loc[:-1]), guess[0]])}?" if guess else "check the spelling"
        return f"{where}: unknown key; {hint} (see the job spec reference: vlbatch spec --reference)"
    return f"{where}: {error['msg']}"


def validate_job(data: Any, source: str | None = "<job spec>") -> CaptionVideosJob | OcrDocumentsJob:
    """A job from a parsed mapping; every error is reported with its field path and `source` (the file)."""
    where = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise JobSpecError(f"{where}a job spec is a mapping of keys (kind, inputs, output, model, ...)")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        lines = "\n".join(f"  {_describe(err)}" for err in e.errors())
        raise JobSpecError(f"{where}invalid job spec ({e.error_count()} error(s)):\n{lines}") from None


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
