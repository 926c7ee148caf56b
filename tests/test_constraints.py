"""JSON-schema-constrained decoding with the random tiny checkpoint: the constraint, not the weights, makes
every output valid, and rows without a constraint are untouched by their constrained neighbours."""

from __future__ import annotations

import json

import pytest
import torch

from model.engine import Engine, EngineConfig, Request
from model.engine.grammar import grammar_of
from model.engine.sampling import SamplingParams
from model.processor import Processor
from schemas.fields_schema import fields_model

# Bounded strings, arrays and numbers: a compact object of this schema always closes in a few dozen tokens.
SHOT_SCHEMA = {
    "type": "object",
    "properties": {
        "shot_type": {"enum": ["wide", "medium", "close-up"]},
        "people": {"type": "integer", "minimum": 0, "maximum": 50},
        "outdoors": {"type": "boolean"},
        "objects": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "camera": {
            "type": "object",
            "properties": {"moving": {"type": "boolean"}, "note": {"type": "string", "maxLength": 16}},
            "required": ["moving", "note"],
            "additionalProperties": False,
        },
    },
    "required": ["shot_type", "people", "outdoors", "objects", "camera"],
    "additionalProperties": False,  # JSON Schema's default lets a generation add keys without end
}
PROMPTS = ["Describe the shot.", "What is in the frame?", "List objects.", "A caption, please.", "Hi"]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return Engine.from_pretrained(tiny_checkpoint, EngineConfig(max_batch_tokens=512, max_num_seqs=16))


@pytest.fixture(scope="module")
def prompts(tiny_checkpoint):
    tokenizer = Processor.from_pretrained(tiny_checkpoint).tokenizer
    return [tokenizer.encode(p) for p in PROMPTS]


def requests(prompts, schema=None, max_new_tokens=120, **sampling):
    params = dict(max_new_tokens=max_new_tokens, json_schema=schema, **sampling)
    return [Request(ids, sampling=SamplingParams(**params)) for ids in prompts]


def test_every_constrained_output_is_a_valid_object_that_stopped(engine, prompts):
    model = fields_model(SHOT_SCHEMA)
    sampled = requests(prompts, SHOT_SCHEMA, temperature=1.0, seed=7)  # noise: the grammar still holds
    outputs = engine.generate(requests(prompts, SHOT_SCHEMA) + sampled)
    for out in outputs:
        assert out.finish_reason == "stop", (out.finish_reason, out.text, out.error)
        fields = model.model_validate_json(out.text)  # raises if the text is not exactly the schema
        assert fields.shot_type in ("wide", "medium", "close-up") and 0 <= fields.people <= 50
        assert len(fields.objects) <= 3 and all(len(o) <= 12 for o in fields.objects)
        assert json.loads(out.text)  # one JSON value, nothing before or after it
    assert engine.stats.mask_seconds > 0


def test_unconstrained_rows_beside_constrained_ones_keep_their_tokens(engine, prompts):
    alone = engine.generate(requests(prompts, max_new_tokens=24))
    mixed = engine.generate(
        [
            r
            for pair in zip(requests(prompts, max_new_tokens=24), requests(prompts, SHOT_SCHEMA))
            for r in pair
        ]
    )
    plain = mixed[0::2]
    assert [o.token_ids for o in plain] == [o.token_ids for o in alone]
    assert all(o.finish_reason == "stop" for o in mixed[1::2])


def test_a_row_cut_at_max_new_tokens_says_length(engine, prompts):
    (out,) = engine.generate(requests(prompts[:1], SHOT_SCHEMA, max_new_tokens=5))
    assert out.finish_reason == "length" and out.num_generated_tokens == 5
    with pytest.raises(ValueError):
        json.loads(out.text)


def test_end_of_sequence_only_where_the_grammar_accepts(engine, prompts):
    eos = sorted(engine.eos_token_ids)
    grammars = engine.grammars()
    matcher = grammars.matcher(SHOT_SCHEMA)
    logits = torch.zeros(1, engine.model_config.vocab_size)
    logits[0, eos] = 100.0  # the model wants to stop at once
    grammars.apply(logits, grammars.start_masks([matcher]))
    assert torch.isinf(logits[0, eos]).all()  # an empty answer is not an object
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed and all(engine.tokenizer.decode([t]).startswith("{") for t in allowed)


def test_a_schema_the_grammar_cannot_take_is_refused_as_an_error_output(engine, prompts):
    with pytest.raises(ValueError, match="JSON schema"):
        grammar_of({"type": "string", "format": "not-a-format"})
    (out,) = engine.generate(requests(prompts[:1], {"type": "string", "format": "not-a-format"}))
    assert out.finish_reason == "error" and "JSON schema" in out.error


# --- through a job: the user's schema becomes a typed struct column ---------------------------------------

CAPTION_SCHEMA = {  # as a user writes it: no additionalProperties, a description the prompt names
    "type": "object",
    "properties": {
        "shot_type": {"enum": ["wide", "medium", "close-up"], "description": "how close the camera is"},
        "people": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 2},
        "text_seen": {"type": ["string", "null"], "maxLength": 12},
        "camera": {"type": "object", "properties": {"moving": {"type": "boolean"}}, "required": ["moving"]},
    },
    "required": ["shot_type", "people", "tags", "text_seen", "camera"],
}
FRONT_MATTER = {  # olmOCR's page front matter, with the text bounded for the random model
    "type": "object",
    "properties": {
        "primary_language": {"type": ["string", "null"], "maxLength": 5},
        "is_rotation_valid": {"type": "boolean"},
        "rotation_correction": {"enum": [0, 90, 180, 270]},
        "is_table": {"type": "boolean"},
        "natural_text": {"type": "string", "maxLength": 40},
    },
    "required": ["primary_language", "is_rotation_valid", "rotation_correction", "is_table", "natural_text"],
}


def test_a_caption_schema_gives_valid_typed_fields_queryable_in_duckdb(tmp_path, pipeline_corpus, ray_local):
    import duckdb
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.driver import run_job
    from schemas import validate_job

    schema_file = tmp_path / "caption.json"
    schema_file.write_text(json.dumps(CAPTION_SCHEMA))
    spec = {**pipeline_corpus["caption"], "output": str(tmp_path / "out"), "caption_schema": str(schema_file)}
    job = validate_job({**spec, "sampling": {"max_new_tokens": 96}})
    assert job.caption_format == "json" and '"shot_type" (how close the camera is)' in job.prompt
    summary = run_job(job, progress=False)
    assert summary.run.ok > 0
    frame = pd.read_parquet(tmp_path / "out")
    ok = frame[frame.status == "ok"]
    assert len(ok) == summary.run.ok
    assert (ok.finish_reason == "stop").all() and ok.fields_valid.all()
    for fields in ok.fields:
        assert fields["shot_type"] in ("wide", "medium", "close-up") and 0 <= fields["people"] <= 99
        assert len(fields["tags"]) <= 2 and isinstance(fields["camera"]["moving"], bool)
    parts = sorted((tmp_path / "out").glob("*.parquet"))
    struct = pq.read_schema(parts[0]).field("fields").type
    assert struct.field("shot_type").type == pa.string() and struct.field("people").type == pa.int64()
    assert struct.field("tags").type == pa.list_(pa.field("item", pa.string(), nullable=False))
    assert struct.field("camera").type == pa.struct([pa.field("moving", pa.bool_(), nullable=False)])
    assert json.loads(pq.read_schema(parts[0]).metadata[b"vlbatch.fields_schema"]) == CAPTION_SCHEMA
    counts = duckdb.sql(
        f"SELECT fields.shot_type AS shot, count(*) AS n FROM read_parquet('{tmp_path / 'out'}/*.parquet') "
        "WHERE status = 'ok' GROUP BY 1"
    ).fetchall()
    assert sum(n for _, n in counts) == summary.run.ok and {s for s, _ in counts} <= {
        "wide",
        "medium",
        "close-up",
    }


def test_an_ocr_page_schema_types_the_front_matter(tmp_path, pipeline_corpus, ray_local):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.driver import run_job
    from schemas import validate_job

    spec = {**pipeline_corpus["ocr"], "output": str(tmp_path / "out"), "page_schema": FRONT_MATTER}
    summary = run_job(validate_job({**spec, "sampling": {"max_new_tokens": 64}}), progress=False)
    table = pq.read_table(tmp_path / "out")
    rows = [r for r in table.to_pylist() if r["status"] == "ok"]
    assert len(rows) == summary.run.ok > 0
    assert all(r["fields_valid"] and r["finish_reason"] == "stop" for r in rows)
    assert all(r["fields"]["rotation_correction"] in (0, 90, 180, 270) for r in rows)
    struct = table.schema.field("fields").type
    assert (
        struct.field("is_table").type == pa.bool_() and struct.field("rotation_correction").type == pa.int64()
    )


@pytest.mark.parametrize(
    "schema, named",
    [
        (
            {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}},
            "anyOf",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": True},
            "additional",
        ),
        ({"type": "object", "properties": {"a": {"type": "string", "format": "hostname"}}}, "format"),
        ({"type": "array", "items": {"type": "string"}}, "object"),
    ],
)
def test_a_schema_that_cannot_be_typed_is_refused_at_job_start(pipeline_corpus, schema, named):
    from schemas import validate_job

    with pytest.raises(ValueError, match="caption_schema") as refused:
        validate_job({**pipeline_corpus["caption"], "caption_schema": schema})
    assert named in str(refused.value)


def test_caption_schema_with_text_format_is_refused(pipeline_corpus):
    from schemas import validate_job

    with pytest.raises(ValueError, match="caption_format"):
        validate_job(
            {**pipeline_corpus["caption"], "caption_schema": CAPTION_SCHEMA, "caption_format": "text"}
        )


def test_another_schema_into_the_same_output_is_refused(tmp_path, pipeline_corpus, ray_local):
    from pipeline.driver import run_job
    from schemas import validate_job

    one_page = str(pipeline_corpus["root"] / "docs" / "h.jpg")
    spec = {**pipeline_corpus["ocr"], "inputs": [one_page], "output": str(tmp_path / "out")}
    spec["sampling"] = {"max_new_tokens": 64}
    run_job(validate_job({**spec, "page_schema": FRONT_MATTER}), progress=False)
    changed = {**FRONT_MATTER, "properties": {**FRONT_MATTER["properties"], "is_table": {"type": "string"}}}
    with pytest.raises(ValueError, match="write to a new output"):
        run_job(validate_job({**spec, "page_schema": changed}), progress=False)
    again = run_job(validate_job({**spec, "page_schema": FRONT_MATTER}), progress=False)
    assert again.items_processed == 0  # the same schema resumes as before
