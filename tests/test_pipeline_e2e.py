"""End to end on a local Ray with the tiny checkpoint: one row per window / page, declared schema, manifest
counts, a rerun that does nothing, error items redone without duplicates, lost results accounted for."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from conftest import PIPELINE_IMAGES, PIPELINE_PDFS, PIPELINE_VIDEOS
from media import make_image, make_pdf, make_random_bytes

from pipeline.driver import run_job
from pipeline.writer import MANIFEST_NAME, part_files
from schemas import SCHEMA_VERSION, CaptionRecord, PageRecord, arrow_schema, records_from_rows, validate_job


def expected_windows(frames: int, fps: float, clip_s: float, min_frames: int = 4) -> int:
    """Windows of clip_s seconds; a tail shorter than min_frames joins the window before it."""
    length = max(2, round(clip_s * fps))
    starts = list(range(0, frames, length))
    if len(starts) > 1 and frames - starts[-1] < min_frames:
        starts.pop()
    return len(starts)


def output(job) -> pd.DataFrame:
    return pd.read_parquet(job.output)


def manifest(job) -> dict:
    return json.loads((Path(job.output) / MANIFEST_NAME).read_text())


def by_name(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {Path(uri).name: group for uri, group in df.groupby("uri")}


def test_one_row_per_window(pipeline_runs):
    job, summary = pipeline_runs["caption"]
    df = output(job)
    groups = by_name(df)
    assert set(groups) == set(PIPELINE_VIDEOS)
    for name, (_, frames, fps, _, _) in PIPELINE_VIDEOS.items():
        rows = groups[name].sort_values("window_index")
        n = expected_windows(frames, fps, job.clip_seconds)
        assert rows.window_index.tolist() == list(range(n)), name
        assert (rows.status == "ok").all(), rows.error_message.tolist()
        assert rows.item_id.nunique() == 1
        for _, r in rows.iterrows():
            stamps = list(r.frame_timestamps)
            assert len(stamps) == r.frame_count >= 2
            assert stamps == sorted(stamps) and r.start_s <= stamps[0] and stamps[-1] < r.end_s
            assert r.visual_tokens > 0 and r.prompt_tokens > 0 and 1 <= r.generated_tokens <= 4
            assert r.width % 28 == 0 and r.height % 28 == 0
    assert not df.duplicated(["item_id", "window_index"]).any()
    assert summary.run.units == len(df) and summary.run.errors == 0
    assert any(expected_windows(f, fps, job.clip_seconds) > 1 for _, f, fps, _, _ in PIPELINE_VIDEOS.values())


def test_one_row_per_page(pipeline_runs):
    job, summary = pipeline_runs["ocr"]
    df = output(job)
    groups = by_name(df)
    assert set(groups) == set(PIPELINE_PDFS) | set(PIPELINE_IMAGES)
    for name, spec in PIPELINE_PDFS.items():
        rows = groups[name].sort_values("page_index")
        assert rows.page_index.tolist() == list(range(spec["pages"]))
        assert rows.page_number.tolist() == list(range(1, spec["pages"] + 1))
        assert (rows.page_count == spec["pages"]).all() and (rows.status == "ok").all()
        for _, r in rows.iterrows():
            image_only = r.page_index in spec.get("image_only_pages", ())
            assert r.has_text_layer is not image_only
            if not image_only:
                assert f"page {r.page_index}" in r.text_layer
    for name in PIPELINE_IMAGES:
        (row,) = groups[name].itertuples()
        assert row.page_index == 0 and row.status == "ok" and not row.has_text_layer
    assert (df.visual_tokens > 0).all() and (df.generated_tokens >= 1).all()
    assert not df.duplicated(["item_id", "page_index"]).any()
    assert summary.run.units == len(df)


@pytest.mark.parametrize("kind, record", [("caption", CaptionRecord), ("ocr", PageRecord)])
def test_schema_as_declared(pipeline_runs, kind, record):
    job, _ = pipeline_runs[kind]
    declared = arrow_schema(record)
    files = part_files(job.output)
    assert files
    for path in files:
        schema = pq.read_schema(path)
        assert schema.names == declared.names
        assert [f.type for f in schema] == [f.type for f in declared]
        assert schema.metadata[b"vlbatch.schema_version"] == SCHEMA_VERSION.encode()
    records = records_from_rows(output(job).to_dict("records"), record)
    assert {r.job_id for r in records} == {pipeline_runs[kind][1].job_id}
    assert all(r.model_id == Path(job.model).name and r.model_fingerprint for r in records)


@pytest.mark.parametrize("kind, unit", [("caption", "windows"), ("ocr", "pages")])
def test_manifest_counts_match_output(pipeline_runs, kind, unit):
    job, summary = pipeline_runs[kind]
    df, m = output(job), manifest(job)
    assert m["status"] == "finished" and m["job_id"] == summary.job_id
    assert m["counts"] == {
        "items": df.item_id.nunique(),
        unit: len(df),
        "ok": int((df.status == "ok").sum()),
        "errors": int((df.status == "error").sum()),
    }
    assert m["tokens"] == {
        k: int(df[k].sum()) for k in ("prompt_tokens", "visual_tokens", "generated_tokens")
    }
    run = m["run"]
    assert (
        run[unit] == len(df) and run["items_processed"] == df.item_id.nunique() and run["items_skipped"] == 0
    )
    assert run["generated_tokens"] == df.generated_tokens.sum() and run["generated_tokens_per_s"] > 0
    assert run["gpu_busy_s"] > 0 and run["wall_s"] > 0
    assert m["spec"] == job.model_dump(mode="json") and m["errors"] == []
    assert m["model"]["id"] == Path(job.model).name and m["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("kind", ["caption", "ocr"])
def test_output_reads_back_in_pandas_and_pyarrow(pipeline_runs, kind):
    job, _ = pipeline_runs[kind]
    df = output(job)
    table = pads.dataset(job.output, format="parquet").to_table()
    assert table.num_rows == len(df) > 0
    assert sorted(table.column("item_id").to_pylist()) == sorted(df.item_id)


@pytest.mark.parametrize("kind", ["caption", "ocr"])
def test_second_run_does_no_work(pipeline_runs, kind):
    job, first = pipeline_runs[kind]
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in part_files(job.output)}
    rows_before = output(job)

    def no_ray():
        raise AssertionError("a rerun over a finished output must not start any work")

    again = run_job(job, progress=False, connect=no_ray)
    assert again.items_processed == 0 and again.items_skipped == first.items and again.run.units == 0
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in part_files(job.output)} == before
    pd.testing.assert_frame_equal(output(job), rows_before)
    m = manifest(job)
    assert m["run"]["items_processed"] == 0 and m["counts"]["items"] == first.items
    assert [r["job_id"] for r in m["runs"]][-2:] == [first.job_id, again.job_id]


def test_error_items_are_redone_and_replaced(tmp_path, pipeline_corpus, ray_local):
    docs = tmp_path / "docs"
    docs.mkdir()
    make_image(docs / "good.png")
    bad = make_random_bytes(docs / "bad.pdf")
    job = validate_job({**pipeline_corpus["ocr"], "inputs": [str(docs)], "output": str(tmp_path / "out")})

    first = run_job(job, progress=False)
    df = output(job)
    (err,) = df[df.uri.str.endswith("bad.pdf")].itertuples()
    assert err.status == "error" and err.error_stage == "decode" and "bad.pdf" in err.error_message
    assert err.page_index is None or pd.isna(err.page_index)
    assert manifest(job)["errors"][0]["uri"] == str(bad)

    second = run_job(job, progress=False)  # the bad file is tried again; the good one is not
    df = output(job)
    assert second.items_processed == 1 and len(df) == 2
    assert df.set_index("uri").job_id.to_dict() == {
        str(docs / "good.png"): first.job_id,
        str(bad): second.job_id,
    }

    make_pdf(bad, pages=2)  # the file is fixed: a new version, a new item id
    third = run_job(job, progress=False)
    df = output(job)
    fixed = df[df.uri == str(bad)]
    assert third.items_processed == 1 and len(df) == 3
    assert (
        fixed.page_index.tolist() == [0, 1] and (fixed.status == "ok").all() and fixed.job_id.nunique() == 1
    )
    assert not df.duplicated(["uri", "page_index"]).any()


@pytest.mark.parametrize("passes", [0, 1])
def test_results_that_never_arrive_are_run_again_then_become_error_rows(
    tmp_path, pipeline_corpus, ray_local, monkeypatch, passes
):
    """Ray can lose work (a dropped block, a node gone with its blocks): the items whose results did not
    all arrive run again in a further pass of the same job (limits.lost_item_passes); those still
    missing after the last pass become error rows."""
    import ray.data

    import pipeline.driver as job_module

    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("whole.png", "partial.pdf", "lost.pdf"):
        shutil.copy(
            pipeline_corpus["root"] / "docs" / ("g.png" if name.endswith("png") else "e.pdf"), docs / name
        )
    spec = {**pipeline_corpus["ocr"], "inputs": [str(docs)], "output": str(tmp_path / "out")}
    job = validate_job({**spec, "limits": {"lost_item_passes": passes}})
    calls: list[set[str]] = []

    def fake_dataset(job, items, job_id, model, **_):
        calls.append({Path(it.uri).name for it in items})
        ids = {Path(it.uri).name: it.item_id for it in items}

        def row(name, ordinal, total=None):
            return {
                "item_id": ids[name],
                "uri": str(docs / name),
                "job_id": job_id,
                "status": "ok",
                "page_index": ordinal,
                "unit_ordinal": ordinal,
                "units_total": total,
                "generated_tokens": 1,
            }

        if len(calls) > 1:  # the second pass: everything it is given comes back whole
            return ray.data.from_items(
                [row(n, i, 3 if i == 2 else None) for n in sorted(ids) for i in range(3)]
            )
        # whole.png: its one page; partial.pdf: 2 of its 3 pages, the last one twice; lost.pdf: nothing.
        rows = [
            row("whole.png", 0, 1),
            row("partial.pdf", 0),
            row("partial.pdf", 2, 3),
            row("partial.pdf", 2, 3),
        ]
        return ray.data.from_items(rows)

    monkeypatch.setattr(job_module, "build_dataset", fake_dataset)
    summary = run_job(job, progress=False)
    if passes:
        assert calls == [{"whole.png", "partial.pdf", "lost.pdf"}, {"partial.pdf", "lost.pdf"}]
        df = output(job)
        assert len(df) == 7 and (df.status == "ok").all() and summary.run.errors == 0
        assert not df.duplicated(["item_id", "page_index"]).any()
        return
    assert len(calls) == 1
    df = output(job).set_index("uri")
    assert len(df) == 3 and summary.run.units == 3
    assert df.loc[str(docs / "whole.png"), "status"] == "ok"
    for name, fragment in (
        ("partial.pdf", "only 2 of its results came back"),
        ("lost.pdf", "no result came back"),
    ):
        r = df.loc[str(docs / name)]
        assert r.status == "error" and r.error_stage == "pipeline" and fragment in r.error_message
        assert name in r.error_message
    assert manifest(job)["counts"]["errors"] == 2


def test_stages_run_without_ray(pipeline_corpus):
    """Each stage is a plain callable: decode -> prepare -> pack -> infer -> postprocess, by hand."""
    import pyarrow as pa

    from pipeline.decode.stage import DecodeUnits, make_decoder
    from pipeline.infer import Infer, model_identity
    from pipeline.packing import pack_table
    from pipeline.postprocess import Postprocess
    from pipeline.prepare import Prepare
    from pipeline.sources import expand_inputs

    job = validate_job(pipeline_corpus["ocr"])
    items = [it for it in expand_inputs(job.inputs, "document") if it.uri.endswith(("e.pdf", "g.png"))]
    decoded = pa.concat_tables(
        t
        for it in items
        for t in DecodeUnits(make_decoder(job), PageRecord, "j")(pa.Table.from_pylist([it.__dict__]))
    )
    prepared = Prepare(job.model, PageRecord, job.prompt)(decoded)
    assert prepared.column("cost_tokens").to_pylist() == [
        p + v
        for p, v in zip(
            prepared.column("prompt_tokens").to_pylist(), prepared.column("visual_tokens").to_pylist()
        )
    ]
    packs = pack_table(prepared, max_pack_tokens=job.resources.max_pack_tokens)
    infer = Infer(job.model, PageRecord, job.sampling.model_dump(), dtype="float32", device="cpu")
    results = pa.concat_tables(infer(packs.slice(k, 1)) for k in range(packs.num_rows))
    rows = Postprocess(job, *model_identity(job.model))(results).to_pylist()
    assert len(rows) == 3 + 1 and all(r["status"] == "ok" for r in rows)
    assert all(1 <= r["generated_tokens"] <= job.sampling.max_new_tokens and r["model_id"] for r in rows)
    assert sum(r["busy_s"] or 0 for r in rows) > 0


def test_a_failed_run_keeps_whole_items_and_the_rerun_does_the_rest(
    tmp_path, pipeline_corpus, ray_local, monkeypatch
):
    import pyarrow as pa

    import pipeline.driver as job_module

    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("one.png", "two.png"):
        shutil.copy(pipeline_corpus["root"] / "docs" / "g.png", docs / name)
    job = validate_job({**pipeline_corpus["ocr"], "inputs": [str(docs)], "output": str(tmp_path / "out")})
    real_build = job_module.build_dataset

    class Dies:
        """Delivers the first item's result, then the driver loses the cluster."""

        def __init__(self, items, job_id):
            first = items[0]
            self.row = {
                "item_id": first.item_id,
                "uri": first.uri,
                "job_id": job_id,
                "status": "ok",
                "page_index": 0,
                "unit_ordinal": 0,
                "units_total": 1,
            }

        def iter_batches(self, **kwargs):
            yield pa.Table.from_pylist([self.row])
            raise ConnectionError("the Ray cluster went away")

    monkeypatch.setattr(job_module, "build_dataset", lambda job, items, job_id, *_, **__: Dies(items, job_id))
    with pytest.raises(ConnectionError):
        run_job(job, progress=False)
    assert manifest(job)["status"] == "failed" and "went away" in manifest(job)["error"]
    assert len(output(job)) == 1

    monkeypatch.setattr(job_module, "build_dataset", real_build)
    rerun = run_job(job, progress=False)
    df = output(job)
    assert rerun.items_processed == 1 and rerun.items_skipped == 1 and rerun.finished
    assert sorted(Path(u).name for u in df.uri) == ["one.png", "two.png"] and (df.status == "ok").all()
