"""User JSON schemas of the `fields` column: refused where they cannot be constrained or typed, else a
pydantic model whose Arrow struct is typed and round-trips through Parquet."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest

from schemas.fields_schema import SchemaError, fields_model, load_fields_schema, schema_keys
from schemas.records import (
    CaptionFields,
    PageRecord,
    _arrow_type,
    arrow_schema,
    fields_type,
    record_with_fields,
    records_from_rows,
    records_to_table,
)

SHOT = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Shot",
    "type": "object",
    "$defs": {
        "Camera": {
            "type": "object",
            "properties": {
                "moving": {"type": "boolean"},
                "note": {"type": ["string", "null"], "maxLength": 16},
            },
            "required": ["moving", "note"],
            "additionalProperties": False,
        }
    },
    "properties": {
        "shot_type": {"enum": ["wide", "medium", "close-up"], "description": "framing"},
        "people": {"type": "integer", "minimum": 0, "maximum": 50},
        "brightness": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "outdoors": {"type": "boolean"},
        "objects": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "camera": {"$ref": "#/$defs/Camera"},
        "place": {"type": "object", "properties": {"city": {"type": "string"}, "floor": {"type": "integer"}}},
        "taken": {"type": "string", "format": "date-time"},
    },
    "required": ["shot_type", "people", "outdoors", "objects", "camera"],
}
GOOD = {
    "shot_type": "wide",
    "people": 3,
    "brightness": 0.5,
    "outdoors": True,
    "objects": ["car", "tree"],
    "camera": {"moving": False, "note": None},
    "place": {"city": "Oslo"},
}


def row_model(fields):
    return pydantic.create_model("Row", item_id=(str, ...), fields=(fields | None, None))


def test_a_rich_schema_validates_good_output_and_keeps_property_order():
    model = fields_model(SHOT, "caption_schema")
    fields = model.model_validate_json(json.dumps(GOOD))
    assert fields.camera.moving is False and fields.camera.note is None and fields.place.floor is None
    assert fields.taken is None and list(model.model_fields) == list(SHOT["properties"])
    assert fields.model_dump()["objects"] == ["car", "tree"]
    assert model.json_schema_source == SHOT and schema_keys(SHOT) == list(SHOT["properties"])
    assert type(fields.camera).__name__ == "FieldsCamera" and type(fields.place).__name__ == "FieldsPlace"


@pytest.mark.parametrize(
    "change",
    [
        {"objects": ["a-very-long-object-name"]},  # maxLength of an item
        {"objects": ["a", "b", "c", "d"]},  # maxItems
        {"shot_type": "aerial"},  # enum
        {"people": 51},  # maximum
        {"people": "3"},  # strict: a string is no integer
        {"brightness": 0},  # exclusiveMinimum
        {"extra": 1},  # additional key at the top
        {"camera": {"moving": True, "note": None, "zoom": 2}},  # additional key in a $ref'd object
        {"camera": {"moving": True}},  # required-nullable must still be present
        {"place": {"city": 5}},
    ],
)
def test_output_that_breaks_the_schema_is_rejected(change):
    with pytest.raises(pydantic.ValidationError):
        fields_model(SHOT).model_validate_json(json.dumps({**GOOD, **change}))


def test_a_missing_required_key_is_rejected():
    with pytest.raises(pydantic.ValidationError):
        fields_model(SHOT).model_validate({k: v for k, v in GOOD.items() if k != "people"})


def test_the_arrow_struct_has_typed_children():
    struct = arrow_schema(row_model(fields_model(SHOT))).field("fields").type
    types = {struct.field(i).name: struct.field(i) for i in range(struct.num_fields)}
    assert [struct.field(i).name for i in range(struct.num_fields)] == list(SHOT["properties"])
    assert types["shot_type"].type == pa.string() and not types["shot_type"].nullable
    assert types["people"].type == pa.int64() and not types["people"].nullable
    assert types["brightness"].type == pa.float64() and types["brightness"].nullable
    assert types["outdoors"].type == pa.bool_()
    assert types["objects"].type == pa.list_(pa.field("item", pa.string(), nullable=False))
    assert types["camera"].type == pa.struct(
        [pa.field("moving", pa.bool_(), nullable=False), pa.field("note", pa.string())]
    )
    assert types["place"].type == pa.struct([pa.field("city", pa.string()), pa.field("floor", pa.int64())])
    assert types["taken"].type == pa.string()


def test_the_struct_round_trips_through_parquet(tmp_path):
    model = fields_model(SHOT)
    schema = arrow_schema(row_model(model))
    instance = model.model_validate(GOOD)
    rows = [{"item_id": "a", "fields": instance.model_dump(by_alias=True)}, {"item_id": "b", "fields": None}]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "out.parquet")
    assert pq.read_schema(tmp_path / "out.parquet").field("fields").type == schema.field("fields").type
    df = pd.read_parquet(tmp_path / "out.parquet")
    back = df["fields"][0]
    assert back["people"] == 3 and back["camera"] == {"moving": False, "note": None} and back["taken"] is None
    assert list(back["objects"]) == ["car", "tree"] and df["fields"][1] is None
    assert model.model_validate({**back, "objects": list(back["objects"])}) == instance


def test_the_built_in_caption_schema_gives_its_own_arrow_type():
    model = fields_model(CaptionFields.model_json_schema())
    assert _arrow_type(model, "fields") == _arrow_type(CaptionFields, "fields")
    assert str(_arrow_type(model, "f")[0]) == str(_arrow_type(CaptionFields, "f")[0])
    assert model.model_validate({"summary": "a dog"}).objects == []  # the default, not null


def test_pydantic_schemas_with_optional_fields_defs_and_literals_load():
    class Camera(pydantic.BaseModel):
        moving: bool
        label: str | None = pydantic.Field(None, max_length=8)

    class Shot(pydantic.BaseModel):
        kind: str = pydantic.Field(pattern="^(wide|close)$")
        level: int = pydantic.Field(1, ge=0, le=3)
        mood: pydantic.conlist(str, max_length=2) | None = None
        camera: Camera | None = None
        side: Camera
        tone: str = "neutral"

    model = fields_model(Shot.model_json_schema())
    assert _arrow_type(model, "f") == _arrow_type(Shot, "f")
    ok = model.model_validate({"kind": "wide", "side": {"moving": True}, "camera": None})
    assert ok.level == 1 and ok.tone == "neutral" and ok.side.label is None
    for bad in ({"kind": "far", "side": {"moving": True}}, {"kind": "wide", "side": {"moving": 1}}):
        with pytest.raises(pydantic.ValidationError):
            model.model_validate(bad)


def test_odd_property_names_keep_their_json_names():
    schema = {
        "type": "object",
        "properties": {n: {"type": "string"} for n in ("_id", "on-screen text", "class", "json", "x", "1st")},
    }
    model = fields_model(schema)
    data = {n: n for n in schema["properties"]}
    fields = model.model_validate_json(json.dumps(data))
    assert fields.model_dump(by_alias=True) == data and fields.model_dump() == data
    assert all(name.isidentifier() for name in model.model_fields)
    struct = _arrow_type(model, "f")[0]
    assert [struct.field(i).name for i in range(struct.num_fields)] == list(data)


def test_refs_to_definitions_and_oneof_nullable():
    schema = {
        "type": "object",
        "definitions": {"Tag": {"type": "string", "maxLength": 3}},
        "properties": {
            "tags": {"type": "array", "items": {"$ref": "#/definitions/Tag"}, "minItems": 1},
            "best": {"oneOf": [{"type": "null"}, {"$ref": "#/definitions/Tag"}]},
        },
        "required": ["tags", "best"],
    }
    model = fields_model(schema)
    assert model.model_validate({"tags": ["a"], "best": None}).best is None
    for bad in ({"tags": [], "best": None}, {"tags": ["long"], "best": None}, {"tags": ["a"]}):
        with pytest.raises(pydantic.ValidationError):
            model.model_validate(bad)


def obj(**props):
    return {"type": "object", "properties": props}


S = {"type": "string"}
REFUSED = [
    (obj(tags={"anyOf": [S, {"type": "integer"}]}), "properties.tags.anyOf", "union"),
    (obj(tags={"oneOf": [S, {"type": "null"}, {"type": "integer"}]}), "properties.tags.oneOf", "union"),
    (obj(t={"type": ["string", "integer"]}), "properties.t.type", "union"),
    (obj(t={"allOf": [S]}), "properties.t.allOf", "allOf"),
    (obj(t={"type": "string", "not": {"const": "x"}}), "properties.t.not", "not"),
    (obj(t={"type": "string", "if": S, "then": S}), "properties.t.if", "if"),
    (
        obj(m={"type": "object", "properties": {"a": S}, "patternProperties": {"^x": S}}),
        "properties.m.patternProperties",
        "patternProperties",
    ),
    (
        obj(m={"type": "object", "properties": {"a": S}, "additionalProperties": True}),
        "properties.m.additionalProperties",
        "additionalProperties",
    ),
    (
        obj(m={"type": "object", "properties": {"a": S}, "additionalProperties": S}),
        "properties.m.additionalProperties",
        "additionalProperties",
    ),
    (
        obj(m={"type": "object", "properties": {"a": S}, "propertyNames": S}),
        "properties.m.propertyNames",
        "propertyNames",
    ),
    (
        obj(m={"type": "object", "properties": {"a": S}, "dependentRequired": {"a": ["a"]}}),
        "properties.m.dependentRequired",
        "dependentRequired",
    ),
    (
        obj(m={"type": "object", "properties": {"a": S}, "dependentSchemas": {"a": S}}),
        "properties.m.dependentSchemas",
        "dependentSchemas",
    ),
    (obj(a={"type": "array", "prefixItems": [S]}), "properties.a.prefixItems", "prefixItems"),
    (obj(a={"type": "array", "items": [S, S]}), "properties.a.items", "items"),
    (obj(a={"type": "array", "items": S, "uniqueItems": True}), "properties.a.uniqueItems", "uniqueItems"),
    (obj(a={"type": "array", "items": S, "contains": S}), "properties.a.contains", "contains"),
    (obj(a={"type": "array"}), "properties.a.items", "items"),
    (obj(n={"type": "integer", "multipleOf": 5}), "properties.n.multipleOf", "multipleOf"),
    (obj(s={"type": "string", "format": "hostname"}), "properties.s.format", "format"),
    (obj(s={"type": "string", "pattern": "(?=x)"}), "properties.s.pattern", "pattern"),
    (obj(s={"type": "string", "maxLength": -1}), "properties.s.maxLength", "maxLength"),
    (
        obj(n={"type": "number", "exclusiveMinimum": True}),
        "properties.n.exclusiveMinimum",
        "exclusiveMinimum",
    ),
    (
        {
            "type": "object",
            "$defs": {"N": obj(next={"$ref": "#/$defs/N"})},
            "properties": {"n": {"$ref": "#/$defs/N"}},
        },
        "$defs.N.properties.next.$ref",
        "recursive",
    ),
    (
        {
            "type": "object",
            "$defs": {"N": obj(kids={"type": "array", "items": {"$ref": "#/$defs/N"}})},
            "properties": {"n": {"$ref": "#/$defs/N"}},
        },
        "$defs.N.properties.kids.items.$ref",
        "recursive",
    ),
    (obj(r={"$ref": "other.json#/$defs/X"}), "properties.r.$ref", "$ref"),
    (obj(r={"$ref": "#/$defs/Missing"}), "properties.r.$ref", "Missing"),
    (obj(r={"$ref": "#/$defs/X", "maxLength": 3}), "properties.r.maxLength", "$ref"),
    (obj(o={"type": "object"}), "properties.o.properties", "properties"),
    (obj(o={"type": "object", "properties": {}}), "properties.o.properties", "properties"),
    (obj(e={"enum": ["a", 1]}), "properties.e.enum", "enum"),
    (obj(e={"enum": [0.5, 1.5]}), "properties.e.enum", "enum"),
    (obj(e={"enum": ["a", None]}), "properties.e.enum", "enum"),
    (obj(e={"enum": [{"a": 1}]}), "properties.e.enum", "enum"),
    (obj(e={"enum": [True, False]}), "properties.e.enum", "enum"),
    (obj(e={"type": "integer", "enum": ["a"]}), "properties.e.type", "enum"),
    (obj(c={"const": 1.5}), "properties.c.const", "const"),
    (obj(u={"description": "no type"}), "properties.u", "type"),
    (obj(u=True), "properties.u", "type"),
    (obj(u={"type": "null"}), "properties.u.type", "null"),
    (obj(s={"type": "string", "minimum": 3}), "properties.s.minimum", "minimum"),
    (
        obj(s={"type": "string", "contentEncoding": "base64"}),
        "properties.s.contentEncoding",
        "contentEncoding",
    ),
    (obj(o={"type": "object", "properties": {"a": S}, "required": ["b"]}), "properties.o.required", "'b'"),
    ({"type": "object", "properties": {"a": S}, "minProperties": 1}, "minProperties", "minProperties"),
    ({"type": "array", "items": S}, "type", "object"),
    ({"properties": {"a": S}}, "type", "object"),
]


@pytest.mark.parametrize("schema, path, word", REFUSED, ids=[f"{p}-{w}" for _, p, w in REFUSED])
def test_features_that_cannot_be_constrained_or_typed_are_refused_by_path(schema, path, word):
    with pytest.raises(SchemaError) as err:
        fields_model(schema, "caption_schema")
    message = str(err.value)
    assert message.startswith(f"caption_schema: {path}: ") and word in message, message


def test_the_union_message_says_what_to_do():
    with pytest.raises(SchemaError, match=r'use one type, or \[type, "null"\]'):
        fields_model(obj(tags={"anyOf": [S, {"type": "integer"}]}), "caption_schema")


def test_a_default_that_does_not_fit_is_refused():
    with pytest.raises(SchemaError, match=r"properties\.n\.default"):
        fields_model(obj(n={"type": "integer", "maximum": 3, "default": 9}))


def test_load_reads_json_yaml_and_inline(tmp_path):
    schema = obj(a=S)
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "s.yaml").write_text("type: object\nproperties:\n  a: {type: string}\n")
    assert load_fields_schema(str(tmp_path / "s.json")) == schema
    assert load_fields_schema(str(tmp_path / "s.yaml")) == schema
    assert load_fields_schema(json.dumps(schema)) == schema
    assert load_fields_schema(schema) is schema


def test_load_names_the_file_or_setting_in_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(SchemaError, match=f"page_schema: {missing}: no such file"):
        load_fields_schema(str(missing), "page_schema")
    (tmp_path / "bad.yaml").write_text("type: [object\n")
    with pytest.raises(SchemaError, match="bad.yaml"):
        load_fields_schema(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(SchemaError, match="list.json: holds a list"):
        load_fields_schema(str(tmp_path / "list.json"))
    with pytest.raises(SchemaError, match="caption_schema"):
        load_fields_schema("{not json", "caption_schema")
    with pytest.raises(SchemaError, match=r"\.json, \.yaml or \.yml"):
        load_fields_schema("schema.txt")


def test_odd_names_round_trip_through_a_record_table(tmp_path):
    schema = {
        "type": "object",
        "properties": {"_id": S, "on-screen": {"type": "array", "items": S}, "json": S},
    }
    record = record_with_fields(PageRecord, schema)
    fields = fields_type(record).model_validate({"_id": "7", "on-screen": ["EXIT"], "json": "{}"})
    row = record(job_id="j", item_id="i", uri="u", status="ok", fields=fields, fields_valid=True)
    pq.write_table(records_to_table([row], record), tmp_path / "out.parquet")
    rows = pd.read_parquet(tmp_path / "out.parquet").to_dict("records")
    assert rows[0]["fields"]["on-screen"][0] == "EXIT" and rows[0]["fields"]["_id"] == "7"
    assert records_from_rows(rows, record)[0].fields == fields
