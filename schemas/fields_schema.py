"""A job's JSON schema of its `fields` column, checked and turned into a pydantic model.

Generation is constrained to the schema elsewhere (llguidance). Here a schema holding a feature that has no
typed Parquet column, or cannot be constrained, is refused with the feature's JSON path; any other becomes a
pydantic model, from which `schemas.records` derives the Arrow struct.

- Unknown keywords are refused, never ignored: a dropped constraint would go unnoticed.
- Property names that are not safe attribute names (non-identifiers, keywords, a leading `_`, BaseModel
  attributes such as `json`) work: the field gets a safe internal name and the JSON name as alias; models
  dump by alias and the Arrow struct is named by alias, so columns carry the JSON names.
- An optional property with a non-null `default` is `T = default` (never null), other optional ones are
  `T | None = None`: so `CaptionFields.model_json_schema()` gives CaptionFields' own Arrow type.
- Models are strict, and numbers refuse NaN/Infinity, as JSON Schema does ("5" is no integer).
"""

from __future__ import annotations

import copy
import json
import keyword
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment"})
FORMATS = ("date-time", "date", "time", "email", "uuid")  # typed as plain strings
TYPES = ("string", "integer", "number", "boolean", "object", "array")
_BOUNDS = {"minimum": "ge", "maximum": "le", "exclusiveMinimum": "gt", "exclusiveMaximum": "lt"}
_KEYWORDS = {  # what each type may hold besides `type` and the annotations
    "string": {"minLength", "maxLength", "pattern", "format"},
    "integer": set(_BOUNDS),
    "number": set(_BOUNDS),
    "boolean": set(),
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems", "uniqueItems"},
}
_FALSE_OK = ("additionalProperties", "uniqueItems")  # false is the only value of these we can honour
_UNION = 'a union of several types has no Parquet column type; use one type, or [type, "null"]'
_TUPLE = "a tuple has no list column type; give items one schema, or use an object with named keys"
_OPEN = "an open map has no struct type; list every key under properties (additionalProperties: false)"
_COND = "conditional schemas have no single column type; write one schema with optional keys"
_DROP = "it cannot be constrained while generating; drop it and check it after the run"
_REFUSED = {
    **dict.fromkeys(["anyOf", "oneOf"], _UNION),
    "allOf": "merging schemas is not supported; write the merged object out as one schema",
    **dict.fromkeys(["if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies"], _COND),
    **dict.fromkeys(["patternProperties", "additionalProperties", "propertyNames"], _OPEN),
    **dict.fromkeys(["prefixItems", "unevaluatedItems"], _TUPLE),
    **dict.fromkeys(["not", "uniqueItems", "contains", "minContains", "maxContains", "multipleOf"], _DROP),
}
_CONFIG = ConfigDict(
    extra="forbid", strict=True, populate_by_name=True, serialize_by_alias=True, protected_namespaces=()
)


class SchemaError(ValueError):
    """A fields schema that cannot be constrained or typed; the message names where and what to do."""


def load_fields_schema(value: str | dict, what: str = "fields schema") -> dict:
    """The JSON schema `value` names: a dict as is, a string that starts with '{' parsed as JSON, else a path
    to a .json / .yaml / .yml file, read."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise SchemaError(f"{what}: give a JSON schema object, or the path of a .json/.yaml file")
    if value.lstrip().startswith("{"):
        parse, text, where = json.loads, value, f"{what} (inline JSON)"
    else:
        path = Path(value).expanduser()
        if path.suffix.lower() not in (".json", ".yaml", ".yml"):
            raise SchemaError(f"{what}: {value}: give a .json, .yaml or .yml file, or the schema inline")
        if not path.is_file():
            raise SchemaError(f"{what}: {path}: no such file; check the path (relative to {Path.cwd()})")
        parse = json.loads if path.suffix.lower() == ".json" else yaml.safe_load
        text, where = path.read_text(encoding="utf-8"), f"{what}: {path}"
    try:
        schema = parse(text)
    except (ValueError, yaml.YAMLError) as e:
        raise SchemaError(f"{where}: cannot be parsed ({_line(e)}); fix the syntax") from e
    if not isinstance(schema, dict):
        raise SchemaError(f"{where}: holds a {type(schema).__name__}, not a JSON schema object")
    return schema


def fields_model(schema: dict, what: str = "fields schema", name: str = "Fields") -> type[BaseModel]:
    """A pydantic model of an object schema; raises SchemaError naming the first feature that cannot be
    constrained or typed."""
    builder = _Builder(schema, what)
    if not isinstance(schema, dict) or schema.get("type") != "object":
        builder.fail(["type"], 'the top level must be "type": "object" with properties; wrap it in one')
    top = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}  # reached by $ref only
    model = builder.type_of(top, [], name)[0]
    model.json_schema_source = copy.deepcopy(schema)
    return model


def schema_keys(schema: dict) -> list[str]:
    """The top-level property names of an object schema, in order (for prompts)."""
    return list(schema.get("properties") or {})


class _Builder:
    def __init__(self, root: dict, what: str):
        self.root, self.what = root, what

    def fail(self, path: list[str], problem: str) -> None:
        raise SchemaError(f"{self.what}: {'.'.join(path) or '(top level)'}: {problem}")

    def only(self, node: dict, allowed: set[str], path: list[str], problem: str) -> None:
        for key in node:
            if key not in allowed and key not in ANNOTATIONS:
                self.fail(path + [key], f"{key} {problem}")

    def type_of(self, node: Any, path: list[str], name: str, refs: tuple[str, ...] = ()) -> tuple[Any, bool]:
        """(python type, nullable) of one schema."""
        if not isinstance(node, dict):
            self.fail(path, "is not a schema object; give it a type")
        if "$ref" in node:
            self.only(node, {"$ref"}, path, "beside $ref; move it into the definition")
            ref = node["$ref"]
            target, where = self.resolve(ref, path + ["$ref"])
            if ref in refs:
                self.fail(path + ["$ref"], f"{ref} is recursive, which has no Parquet type; unroll it")
            return self.type_of(target, where, name, refs + (ref,))
        for union in ("anyOf", "oneOf"):  # [X, null] is how pydantic writes Optional[X]
            if union in node:
                branches = node[union] if isinstance(node[union], list) else []
                nulls = [i for i, b in enumerate(branches) if b == {"type": "null"}]
                if len(branches) != 2 or len(nulls) != 1:
                    self.fail(path + [union], _UNION)
                self.only(node, {union}, path, f"beside {union}; move it into the non-null branch")
                i = 1 - nulls[0]
                return self.type_of(branches[i], path + [union, str(i)], name, refs)[0], True
        for key, value in node.items():
            if key in _REFUSED and not (key in _FALSE_OK and value is False):
                self.fail(path + [key], _REFUSED[key])
        kind, nullable = node.get("type"), False
        if isinstance(kind, list):
            rest = [k for k in kind if k != "null"]
            if len(kind) != 2 or len(rest) != 1:
                self.fail(path + ["type"], _UNION)
            kind, nullable = rest[0], True
        if "enum" in node or "const" in node:
            return self.literal(node, kind, path), nullable
        if kind is None:
            self.fail(path, f"has no type; give it a type ({', '.join(TYPES)}), an enum, a const or a $ref")
        if kind not in TYPES:
            self.fail(path + ["type"], f"{kind!r} has no column type; use one of {', '.join(TYPES)}")
        takes = ", ".join(sorted(_KEYWORDS[kind])) or "no keywords"
        self.only(node, _KEYWORDS[kind] | {"type"}, path, f"is not supported for {kind} ({takes}); drop it")
        if kind == "object":
            return self.model(node, path, name, refs), nullable
        if kind == "array":
            return self.array(node, path, name, refs), nullable
        if kind == "string":
            return self.string(node, path), nullable
        return (bool if kind == "boolean" else self.number(node, kind, path)), nullable

    def resolve(self, ref: Any, path: list[str]) -> tuple[Any, list[str]]:
        match = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref) if isinstance(ref, str) else None
        if match is None:
            self.fail(path, f"{ref!r}: only local #/$defs/<name> references work; copy the definition in")
        section, def_name = match.group(1), match.group(2).replace("~1", "/").replace("~0", "~")
        defs = self.root.get(section)
        if not isinstance(defs, dict) or def_name not in defs:
            self.fail(path, f"{ref} names no definition; add {def_name!r} under {section}")
        return defs[def_name], [section, def_name]

    def literal(self, node: dict, kind: Any, path: list[str]) -> Any:
        key = "enum" if "enum" in node else "const"
        values = node["enum"] if key == "enum" else [node["const"]]
        kinds = {type(v) for v in values} if isinstance(values, list) else set()
        if not values or kinds not in ([{str}, {int}] + ([{bool}] if key == "const" else [])):
            self.fail(
                path + [key], f"{key} values must be all strings or all integers (or one boolean const)"
            )
        expected = {str: "string", int: "integer", bool: "boolean"}[kinds.pop()]
        if kind is not None and kind != expected:
            self.fail(path + ["type"], f"{kind!r} does not fit {key} values of type {expected}; fix the type")
        self.only(node, {key, "type"}, path, f"beside {key}: the {key} already fixes the values; drop it")
        return Literal[tuple(values)]

    def lengths(self, node: dict, path: list[str], low: str, high: str) -> dict[str, int]:
        for key in (low, high):
            if key in node and (type(node[key]) is not int or node[key] < 0):
                self.fail(path + [key], f"{key} must be a non-negative integer")
        return {arg: node[key] for key, arg in ((low, "min_length"), (high, "max_length")) if key in node}

    def string(self, node: dict, path: list[str]) -> Any:
        kw: dict[str, Any] = self.lengths(node, path, "minLength", "maxLength")
        if node.get("format", FORMATS[0]) not in FORMATS:
            self.fail(
                path + ["format"],
                f"{node['format']!r} cannot be constrained; use {', '.join(FORMATS)} or a pattern",
            )
        if "pattern" in node:
            kw["pattern"] = node["pattern"]
        if not kw:
            return str
        typ = Annotated[str, StringConstraints(**kw)]
        try:
            pydantic.TypeAdapter(typ)  # compiles the pattern now, not at the first row
        except Exception as e:  # noqa: BLE001 - pydantic raises several kinds for a bad regex
            self.fail(path + ["pattern"], f"not a regular expression we can check ({_line(e)})")
        return typ

    def number(self, node: dict, kind: str, path: list[str]) -> Any:
        kw: dict[str, Any] = {} if kind == "integer" else {"allow_inf_nan": False}
        for key, arg in _BOUNDS.items():
            if key in node:
                if type(node[key]) not in (int, float):
                    self.fail(path + [key], f"{key} must be a number (JSON Schema 2020: the bound itself)")
                kw[arg] = node[key]
        typ = int if kind == "integer" else float
        return Annotated[typ, Field(**kw)] if kw else typ

    def array(self, node: dict, path: list[str], name: str, refs: tuple[str, ...]) -> Any:
        items = node.get("items")
        if not isinstance(items, dict):
            self.fail(path + ["items"], _TUPLE if isinstance(items, list) else "give items a schema")
        item, nullable = self.type_of(items, path + ["items"], name + "Item", refs)
        kw = self.lengths(node, path, "minItems", "maxItems")
        typ = list[item | None if nullable else item]
        return Annotated[typ, Field(**kw)] if kw else typ

    def model(self, node: dict, path: list[str], name: str, refs: tuple[str, ...]) -> type[BaseModel]:
        props, required = node.get("properties"), node.get("required", [])
        if not isinstance(props, dict) or not props:
            self.fail(path + ["properties"], "an object with no properties has no struct type; list its keys")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            self.fail(path + ["required"], "required must be a list of property names")
        for key in required:
            if key not in props:
                self.fail(path + ["required"], f"{key!r} is required but not under properties; add it there")
        fields, used = {}, set(props)
        for key, sub in props.items():
            where = path + ["properties", key]
            typ, nullable = self.type_of(sub, where, name + _camel(key), refs)
            typ = typ | None if nullable else typ
            default = sub.get("default")
            if key in required:
                default = ...
            elif default is None:
                typ = typ | None
            else:
                try:  # a default that does not fit would put a bad value in a column that cannot be null
                    default = pydantic.TypeAdapter(typ).validate_python(default, strict=True)
                except pydantic.ValidationError as e:
                    self.fail(where + ["default"], f"does not fit the property's schema ({_line(e)})")
            internal = _python_name(key, used)
            fields[internal] = (typ, Field(default, alias=key if internal != key else None))
        return pydantic.create_model(name, __config__=_CONFIG, **fields)


def _line(error: Exception) -> str:
    return " ".join(str(error).split())


def _camel(key: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"\W+|_", key)) or "Field"


def _safe(name: str) -> bool:
    return name.isidentifier() and not (keyword.iskeyword(name) or name[0] == "_" or hasattr(BaseModel, name))


def _python_name(key: str, used: set[str]) -> str:
    """`key` itself where it is a safe attribute name, else a safe name no other property uses."""
    if _safe(key):
        return key
    name = re.sub(r"\W+", "_", key).strip("_") or "field"
    name = "f_" + name if name[0].isdigit() else name
    while not _safe(name) or name in used:
        name += "_"
    used.add(name)
    return name


def closed_schema(schema: dict) -> dict:
    """A copy of `schema` whose objects admit no keys beyond their properties, as the typed struct has none:
    JSON Schema's default (`additionalProperties` true) would let generation invent keys without end."""

    def close(node: Any) -> Any:
        if isinstance(node, dict):
            node = {k: close(v) for k, v in node.items()}
            if node.get("type") == "object" or "properties" in node:
                node.setdefault("additionalProperties", False)
            return node
        if isinstance(node, list):
            return [close(v) for v in node]
        return node

    return close(copy.deepcopy(schema))
