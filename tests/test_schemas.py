"""Job specs from YAML (field-path errors, overrides) and output records with their derived Parquet schema."""

from __future__ import annotations

import datetime as dt
import typing

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import (
    SCHEMA_VERSION,
    CaptionFields,
    CaptionRecord,
    CaptionVideosJob,
    JobSpecError,
    OcrDocumentsJob,
    PageRecord,
    arrow_schema,
    load_job,
    parse_page_ranges,
    records_from_rows,
    records_to_table,
)
from schemas.jobs import DEFAULT_CAPTION_PROMPT, apply_overrides

BASE = "inputs: [videos/]\noutput: out/\nmodel: /ckpt/Qwen2-VL-2B-Instruct\n"


def write(tmp_path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_kind_selects_the_job_model_with_defaults(tmp_path):
    job = load_job(write(tmp_path, "kind: caption_videos\n" + BASE))
    assert isinstance(job, CaptionVideosJob)
    assert (job.fps, job.min_frames, job.max_frames, job.clip_seconds) == (2.0, 4, 768, 120.0)
    assert job.prompt == DEFAULT_CAPTION_PROMPT and job.resources.max_pack_tokens > 0
    ocr = load_job(write(tmp_path, "kind: ocr_documents\n" + BASE + "page_ranges: 2\n"))
    assert isinstance(ocr, OcrDocumentsJob)
    assert (ocr.target_longest_side, ocr.dpi, ocr.keep_text_layer, ocr.page_ranges) == (1288, None, True, "2")
    assert (
        load_job(write(tmp_path, "kind: ocr_documents\n" + BASE + "dpi: 200\n")).target_longest_side is None
    )


def test_json_captions_ask_for_the_caption_fields(tmp_path):
    job = load_job(write(tmp_path, "kind: caption_videos\ncaption_format: json\n" + BASE))
    assert all(f'"{name}"' in job.prompt for name in CaptionFields.model_fields)


def test_errors_name_the_file_and_every_field_path(tmp_path):
    path = write(
        tmp_path,
        "kind: caption_videos\n" + BASE + "fps: 0\nsampling: {temprature: 0.5}\nlimits: {max_frames: many}\n",
        name="bad.yaml",
    )
    with pytest.raises(JobSpecError) as info:
        load_job(path)
    message = str(info.value)
    assert str(path) in message and "3 error(s)" in message
    for fragment in ["fps:", "sampling.temprature: unknown key", "limits.max_frames:"]:
        assert fragment in message


@pytest.mark.parametrize(
    "text,fragment",
    [
        (BASE, "kind: missing"),
        ("kind: transcribe\n" + BASE, "'transcribe' is not a job kind"),
        ("kind: caption_videos\ninputs: []\noutput: o\nmodel: m\n", "inputs:"),
        ("kind: caption_videos\noutput: o\nmodel: m\n", "inputs: Field required"),
        ("kind: ocr_documents\n" + BASE + "dpi: 100\ntarget_longest_side: 900\n", "not both"),
        ("kind: ocr_documents\n" + BASE + "page_ranges: 3-1\n", "page_ranges"),
        ("kind: caption_videos\n" + BASE + "min_frames: 10\nmax_frames: 4\n", "min_frames"),
        ("- a\n- b\n", "mapping"),
        ("kind: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_specs(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(JobSpecError, match=None) as info:
        load_job(path)
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_overrides_apply_before_validation(tmp_path):
    path = write(tmp_path, "kind: caption_videos\n" + BASE + "sampling: {temperature: 0.2}\n")
    job = load_job(
        path, ["sampling.temperature=0.9", "clip_seconds=30", "limits.max_frames=5", "inputs.0=x.mp4"]
    )
    assert job.sampling.temperature == 0.9 and job.clip_seconds == 30.0 and job.limits.max_frames == 5
    assert job.inputs == ["x.mp4"] and job.sampling.max_new_tokens == 512
    with pytest.raises(JobSpecError, match="sampling.tempreture: unknown key"):
        load_job(path, ["sampling.tempreture=1"])
    with pytest.raises(JobSpecError, match="key=value"):
        load_job(path, ["clip_seconds"])
    assert apply_overrides({}, ["a.b.c=[1, 2]", "d=text"]) == {"a": {"b": {"c": [1, 2]}}, "d": "text"}


def test_page_range_syntax():
    assert parse_page_ranges("1-3, 7,10-,-2") == [(1, 3), (7, 7), (10, None), (1, 2)]
    for bad in ["0", "3-1", "a", "1--2", ""]:
        with pytest.raises(ValueError):
            parse_page_ranges(bad)


def _optional(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def _arrow_of(annotation) -> pa.DataType:
    """What a python annotation must become, written independently of the derivation under test."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if _optional(annotation):
        return _arrow_of(args[0])
    if typing.get_origin(annotation) is typing.Literal:
        return pa.string()
    if typing.get_origin(annotation) is list:
        return pa.list_(pa.field("item", _arrow_of(args[0]), nullable=_optional(args[0])))
    if isinstance(annotation, type) and issubclass(annotation, CaptionFields):
        fields = annotation.model_fields.items()
        return pa.struct(
            [pa.field(n, _arrow_of(f.annotation), nullable=_optional(f.annotation)) for n, f in fields]
        )
    return {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(),
            dt.datetime: pa.timestamp("us", tz="UTC")}[annotation]  # fmt: skip


@pytest.mark.parametrize("model", [CaptionRecord, PageRecord])
def test_arrow_schema_is_derived_field_by_field(model):
    schema = arrow_schema(model)
    assert schema.names == list(model.model_fields)
    assert schema.metadata[b"vlbatch.schema_version"] == SCHEMA_VERSION.encode()
    for name, info in model.model_fields.items():
        field = schema.field(name)
        assert field.type.equals(_arrow_of(info.annotation)), name
        assert field.nullable == _optional(info.annotation), name


def test_a_new_field_appears_without_writing_the_schema_again():
    class Extended(PageRecord):
        language: str | None = None
        scores: list[float] = []

    schema = arrow_schema(Extended)
    assert schema.field("language").type == pa.string() and schema.field("language").nullable
    assert schema.field("scores").type.value_type == pa.float64() and not schema.field("scores").nullable


def caption_records() -> list[CaptionRecord]:
    ok = CaptionRecord(
        job_id="j1",
        item_id="i1",
        uri="/v/a.mp4",
        status="ok",
        model_id="Qwen2-VL-2B-Instruct",
        window_index=0,
        num_windows=2,
        start_s=0.0,
        end_s=30.0,
        frame_count=4,
        frame_timestamps=[0.0, 10.0, 20.0, 29.5],
        width=392,
        height=280,
        prompt_tokens=20,
        visual_tokens=280,
        generated_tokens=31,
        finish_reason="stop",
        text='{"summary": "a cat"}',
        fields=CaptionFields(summary="a cat", objects=["cat"]),
        fields_valid=True,
        decode_s=0.5,
        infer_s=1.25,
        created_at=dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    )
    error = CaptionRecord(
        job_id="j1",
        item_id="i2",
        uri="/v/b.mp4",
        status="error",
        error_stage="decode",
        error_message="/v/b.mp4: no video stream",
    )
    return [ok, error]


def page_records() -> list[PageRecord]:
    return [
        PageRecord(
            job_id="j",
            item_id="d",
            uri="/d/x.pdf",
            status="ok",
            page_index=0,
            page_number=1,
            page_count=2,
            text="# Title",
            text_layer="Title",
            has_text_layer=True,
            ocr_truncated=False,
            used_text_layer=False,
            page_width_pt=612.0,
            page_height_pt=792.0,
        ),
        PageRecord(
            job_id="j",
            item_id="d",
            uri="/d/x.pdf",
            status="ok",
            page_index=1,
            page_number=2,
            page_count=2,
            text="cut",
            text_layer="the full text",
            has_text_layer=True,
            ocr_truncated=True,
            used_text_layer=True,
            finish_reason="length",
        ),
    ]


@pytest.mark.parametrize("model,records", [(CaptionRecord, caption_records()), (PageRecord, page_records())])
def test_round_trip_through_parquet_and_pandas(tmp_path, model, records):
    table = records_to_table(records, model)
    assert table.schema.equals(arrow_schema(model), check_metadata=True)
    path = tmp_path / "part.parquet"
    pq.write_table(table, path)
    read = pq.read_table(path)
    assert read.schema.metadata[b"vlbatch.schema_version"] == SCHEMA_VERSION.encode()
    assert read.schema.equals(arrow_schema(model))
    frame = read.to_pandas()
    assert records_from_rows(frame.to_dict("records"), model) == records
    assert records_from_rows(read.to_pylist(), model) == records


def test_video_defaults_match_the_processor():
    from model import pixels
    from schemas.jobs import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, VIDEO_TOTAL_PIXELS

    side = pixels.IMAGE_FACTOR
    assert VIDEO_MIN_PIXELS == pixels.VIDEO_MIN_TOKENS * side * side
    assert VIDEO_MAX_PIXELS == pixels.VIDEO_MAX_TOKENS * side * side
    assert VIDEO_TOTAL_PIXELS == int(pixels.VIDEO_SEQ_LEN * side * side * 0.9)
    job = CaptionVideosJob(inputs=["v"], output="o", model="m")
    assert (job.fps, job.min_frames, job.max_frames) == (
        pixels.VIDEO_FPS,
        pixels.VIDEO_MIN_FRAMES,
        pixels.VIDEO_MAX_FRAMES,
    )
