"""Output rows (one per video window, one per document page) and the Parquet schema derived from them."""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import types
import typing
from typing import Any, Literal, Union

import pyarrow as pa
import pydantic
from pydantic import BaseModel, ConfigDict

# Bump when a field is renamed, removed or changes type; readers check it in the Parquet metadata.
SCHEMA_VERSION = "1"
SCHEMA_VERSION_KEY = b"vlbatch.schema_version"
RECORD_KIND_KEY = b"vlbatch.record"
FIELDS_SCHEMA_KEY = b"vlbatch.fields_schema"  # the JSON schema the `fields` struct was derived from

Status = Literal["ok", "error"]


class CaptionFields(BaseModel):
    """The built-in schema of JSON captions (caption_format: json); generation is constrained to it."""

    model_config = ConfigDict(extra="forbid")

    summary: str
    objects: list[str] = []
    actions: list[str] = []
    on_screen_text: list[str] = []


class RecordBase(BaseModel):
    """Fields every output row carries: identity, outcome, token counts, timings."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    item_id: str
    uri: str
    status: Status
    error_stage: str | None = None  # sources, decode, prepare, infer, postprocess, write
    error_message: str | None = None
    model_id: str | None = None  # checkpoint name or path
    model_fingerprint: str | None = None  # hash of the checkpoint's config and weight index
    width: int | None = None  # pixels fed to the model
    height: int | None = None
    prompt_tokens: int | None = None  # text tokens of the prompt, chat template included
    visual_tokens: int | None = None  # merged vision tokens the model saw
    generated_tokens: int | None = None
    finish_reason: str | None = None  # stop, length, error
    decode_s: float | None = None
    infer_s: float | None = None
    created_at: dt.datetime | None = None
    warning: str | None = None  # an ok row whose input was damaged or cut short: what the row covers


class CaptionRecord(RecordBase):
    """One caption of one window of one video."""

    window_index: int | None = None  # None when the video failed before it was cut into windows
    num_windows: int | None = None
    start_s: float | None = None
    end_s: float | None = None
    frame_count: int | None = None  # sampled frames fed to the model (1: a still, shown twice)
    frame_timestamps: list[float] | None = None  # seconds, of the sampled frames
    sample_fps: float | None = None  # frames per second of the window given to the model, as applied
    source_fps: float | None = None
    source_frame_count: int | None = None  # frames the video's stream holds (not the container's claim)
    source_width: int | None = None
    source_height: int | None = None
    text: str | None = None  # the caption as generated
    fields: CaptionFields | None = None  # the caption's JSON (caption_format: json), typed
    fields_valid: bool | None = None  # None: plain-text captions; False: cut at max_new_tokens or unparsable


class PageRecord(RecordBase):
    """The text of one page of one document (an image file is a one-page document)."""

    page_index: int | None = None  # 0-based; None when the document failed before its pages were read
    page_number: int | None = None  # 1-based, as viewers show it
    page_count: int | None = None
    page_width_pt: float | None = None
    page_height_pt: float | None = None
    text: str | None = None  # OCR output as the model wrote it (markdown)
    text_layer: str | None = None  # the document's own text for this page, when kept
    has_text_layer: bool | None = None
    ocr_truncated: bool | None = None  # generation stopped at max_new_tokens
    used_text_layer: bool | None = None  # `text` is absent or cut, so `text_layer` is the better source


_SCALARS: dict[type, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
    bytes: pa.binary(),
    dt.datetime: pa.timestamp("us", tz="UTC"),
    dt.date: pa.date32(),
}


def _arrow_type(annotation: Any, where: str) -> tuple[pa.DataType, bool]:
    """(arrow type, nullable) of one python annotation."""
    if typing.get_origin(annotation) is typing.Annotated:  # constraints (lengths, bounds) keep the type
        annotation = typing.get_args(annotation)[0]
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(
                f"{where}: unions of several types have no Parquet type; use one type or Optional"
            )
        return _arrow_type(args[0], where)[0], True
    if origin is Literal:
        kinds = {type(v) for v in typing.get_args(annotation)}
        if len(kinds) != 1:
            raise TypeError(f"{where}: a Literal must hold values of one type")
        return _arrow_type(kinds.pop(), where)[0], False
    if origin is list:
        (inner,) = typing.get_args(annotation)
        item, nullable = _arrow_type(inner, where + "[]")
        return pa.list_(pa.field("item", item, nullable=nullable)), False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct(_fields(annotation)), False
    if annotation in _SCALARS:
        return _SCALARS[annotation], False
    raise TypeError(f"{where}: no Parquet type for {annotation!r}")


def _fields(model: type[BaseModel]) -> list[pa.Field]:
    fields = []
    for name, info in model.model_fields.items():
        arrow, nullable = _arrow_type(info.annotation, f"{model.__name__}.{name}")
        fields.append(pa.field(info.alias or name, arrow, nullable=nullable))  # aliases: JSON names
    return fields


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """The Parquet schema of a record model, field by field, with the schema version in its metadata (and
    the JSON schema of its `fields`, where a job gave one)."""
    metadata = {SCHEMA_VERSION_KEY: SCHEMA_VERSION.encode(), RECORD_KIND_KEY: model.__name__.encode()}
    fields_schema = getattr(model, "fields_json_schema", None)
    if fields_schema is not None:
        metadata[FIELDS_SCHEMA_KEY] = json.dumps(fields_schema).encode()
    return pa.schema(_fields(model), metadata=metadata)


@functools.lru_cache(maxsize=32)
def _record_with_fields(record: type[RecordBase], schema_json: str) -> type[RecordBase]:
    from schemas.fields_schema import fields_model

    schema = json.loads(schema_json)
    model = pydantic.create_model(
        record.__name__,
        __base__=record,
        __doc__=record.__doc__,
        fields=(fields_model(schema) | None, None),
        fields_valid=(bool | None, None),
    )
    model.fields_json_schema = schema
    return model


def record_with_fields(record: type[RecordBase], schema: dict[str, Any] | None) -> type[RecordBase]:
    """`record` with a `fields` column typed from a job's JSON schema (and `fields_valid`); as is if None."""
    if schema is None:
        return record
    return _record_with_fields(record, json.dumps(schema))


def fields_type(record: type[BaseModel]) -> type[BaseModel] | None:
    """The pydantic model of a record's `fields` column, or None if it has none."""
    info = record.model_fields.get("fields")
    if info is None:
        return None
    args = [a for a in typing.get_args(info.annotation) if a is not type(None)]
    return args[0] if args else info.annotation


def records_to_table(records: list[BaseModel], model: type[BaseModel]) -> pa.Table:
    """An Arrow table of records, typed by `arrow_schema(model)`."""
    return pa.Table.from_pylist([r.model_dump() for r in records], schema=arrow_schema(model))


def _plain(value: Any) -> Any:
    """pandas/numpy values back to the python values pydantic expects (NaN/NA -> None, arrays -> lists)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    if hasattr(value, "to_pydatetime"):  # pandas Timestamp
        return value.to_pydatetime()
    return value


def records_from_rows(rows: list[dict[str, Any]], model: type[BaseModel]) -> list[Any]:
    """Records from rows read back (`Table.to_pylist()` or `DataFrame.to_dict("records")`)."""
    return [model.model_validate({k: _plain(v) for k, v in row.items()}) for row in rows]
