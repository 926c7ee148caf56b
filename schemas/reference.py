"""The job spec reference (markdown), generated from the pydantic models: every key, its type, default and
meaning. `vlbatch spec --reference` prints it; docs/job_spec.md is a copy a test keeps equal to it."""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from schemas.jobs import (
    DEFAULT_CAPTION_PROMPT,
    DEFAULT_OCR_PROMPT,
    CaptionVideosJob,
    JobBase,
    Limits,
    OcrDocumentsJob,
    Resources,
    Sampling,
    caption_json_prompt,
)

SECTIONS: list[tuple[str, type[BaseModel], str]] = [
    ("Every job", JobBase, ""),
    ("`kind: caption_videos` (with the keys of every job)", CaptionVideosJob, ""),
    ("`kind: ocr_documents` (with the keys of every job)", OcrDocumentsJob, ""),
    ("`sampling:`", Sampling, "sampling."),
    ("`resources:`", Resources, "resources."),
    ("`limits:`", Limits, "limits."),
]


def type_name(annotation: Any) -> str:
    """A field's type as a YAML writer reads it: `int`, `str or null`, `"text" or "json"`, `list of str`."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if origin is Literal:
        return " or ".join(json.dumps(v) for v in typing.get_args(annotation))
    if origin is list:
        return f"list of {type_name(typing.get_args(annotation)[0])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def bounds(info: Any) -> str:
    """The field's numeric and length constraints, e.g. `>= 1`, `> 0, <= 1`."""
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "at least", "max_length": "at most"}
    parts = []
    for meta in info.metadata:
        for attr, sign in signs.items():
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    return ", ".join(parts)


def default_text(info: Any) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
        return "(below)" if isinstance(value, BaseModel) else f"`{json.dumps(value)}`"
    if info.default is PydanticUndefined:
        return "**required**"
    return f"`{json.dumps(info.default)}`"


def own_fields(model: type[BaseModel]) -> list[str]:
    """Fields a job kind adds to (or redefines over) the common ones; all fields of other models."""
    if model is JobBase or not issubclass(model, JobBase):
        return list(model.model_fields)
    return [n for n in model.model_fields if n not in JobBase.model_fields]


DEFAULT_PROMPTS = {
    CaptionVideosJob: [
        f"Default prompt: `{DEFAULT_CAPTION_PROMPT}`",
        f"Default prompt with `caption_format: json`: `{caption_json_prompt()}`",
    ],
    OcrDocumentsJob: [f"Default prompt: `{DEFAULT_OCR_PROMPT}`"],
}


def job_spec_reference() -> str:
    """The whole reference as markdown."""
    lines = [
        "# Job spec reference",
        "",
        "A job spec is a YAML mapping; `kind:` picks one of the two job kinds. Any key can also be set on "
        "the command line with `--set key=value` (dotted for nested keys, e.g. "
        "`--set sampling.temperature=0.7`). Generated from `schemas/jobs.py` by `vlbatch spec --reference`.",
    ]
    for title, model, prefix in SECTIONS:
        lines += ["", f"## {title}", "", " ".join((model.__doc__ or "").split()), ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name in own_fields(model):
            info = model.model_fields[name]
            kind = type_name(info.annotation)
            limit = bounds(info)
            if limit:
                kind += f", {limit}"
            text = info.description or ("Picks this job kind." if name == "kind" else "")
            text = text.replace("|", "\\|").replace("\n", " ")
            kind = kind.replace("|", "\\|")
            lines.append(f"| `{prefix}{name}` | {kind} | {default_text(info)} | {text} |")
        lines += [f"\n{p}" for p in DEFAULT_PROMPTS.get(model, [])]
    return "\n".join(lines) + "\n"
