"""`vlbatch plan` reads metadata only, and its figures equal what the real run then processed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from media import make_random_bytes

import model.qwen2vl
import pipeline.decode.documents
import pipeline.decode.video
from jobs.cli import main
from jobs.plan import plan_job
from schemas import validate_job


@pytest.fixture
def metadata_only(monkeypatch):
    """Planning must never load weights, decode a frame or render a page."""

    def forbidden(*args, **kwargs):
        raise AssertionError("plan touched pixels or weights")

    monkeypatch.setattr(model.qwen2vl.Qwen2VL, "from_pretrained", forbidden)
    monkeypatch.setattr(pipeline.decode.video, "decode_video", forbidden)
    monkeypatch.setattr(pipeline.decode.video, "_decord_windows", forbidden)
    monkeypatch.setattr(pipeline.decode.video, "_pyav_windows", forbidden)
    monkeypatch.setattr(pipeline.decode.documents, "rasterise_page", forbidden)
    monkeypatch.setattr(pipeline.decode.documents, "iter_document_pages", forbidden)


@pytest.mark.parametrize("kind, unit", [("caption", "windows"), ("ocr", "pages")])
def test_plan_equals_run(pipeline_runs, metadata_only, kind, unit):
    job, summary = pipeline_runs[kind]
    plan = plan_job(job)
    total = plan.totals()
    df = pd.read_parquet(job.output)
    assert (df.status == "ok").all()
    frames = int(df.frame_count.sum()) if unit == "windows" else len(df)
    assert total["items"] == df.item_id.nunique() == summary.items
    assert total[unit] == len(df)
    assert total["frames"] == frames
    assert total["visual_tokens"] == df.visual_tokens.sum() == summary.run.visual_tokens
    assert total["prompt_tokens"] == df.prompt_tokens.sum()
    assert total["max_generated_tokens"] == len(df) * job.sampling.max_new_tokens
    assert total["problem_items"] == 0
    # Item by item, not only in sum.
    per_uri = df.groupby("uri").visual_tokens.sum().to_dict()
    assert {p.uri: p.visual_tokens for p in plan.items} == per_uri
    # Everything is done in the output: nothing left to pay for.
    assert plan.totals(remaining=True)["items"] == 0


def test_plan_counts_unreadable_items_as_error_rows(tmp_path, pipeline_corpus, metadata_only):
    docs = tmp_path / "docs"
    docs.mkdir()
    bad = make_random_bytes(docs / "broken.pdf")
    (docs / "ok.pdf").write_bytes((pipeline_corpus["root"] / "docs" / "e.pdf").read_bytes())
    job = validate_job({**pipeline_corpus["ocr"], "inputs": [str(docs)], "output": str(tmp_path / "out")})
    plan = plan_job(job)
    (problem,) = [p for p in plan.items if p.problem]
    assert problem.uri == str(bad) and "broken.pdf" in problem.problem and problem.units == 1
    assert plan.totals()["pages"] == 3 + 1
    assert "broken.pdf" in plan.describe()


def test_plan_command(tmp_path, pipeline_corpus, capsys, metadata_only):
    import yaml

    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({**pipeline_corpus["caption"], "output": str(tmp_path / "fresh")}))
    assert main(["plan", str(spec), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["total"]["items"] == len(list(Path(pipeline_corpus["caption"]["inputs"][0]).iterdir()))
    assert figures["remaining"] == figures["total"]
    assert main(["plan", str(spec), "--set", "sampling.max_new_tokens=10"]) == 0
    text = capsys.readouterr().out
    assert "visual tokens" in text and "10 per window" in text
