"""Faults through the real job (issue #6): a GPU worker that dies mid-batch, decode processes that crash or
hang, a batch that kills every worker, and the whole job SIGKILLed halfway. Each asserts the exact rows.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray  # noqa: F401  (puts the psutil that Ray ships on the path)
import yaml
from media import make_image, make_pdf

from pipeline.decode.stage import make_decoder
from pipeline.decode.supervisor import IsolatedDecoder
from pipeline.driver import run_job
from pipeline.faults import FAULT_EXIT_ENV, FAULT_HANG_ENV, FAULT_INFER_EXIT_ENV, FAULTS_DIR, Fault
from pipeline.storage import TMP_PREFIX
from pipeline.writer import MANIFEST_NAME, part_files, scan_output
from schemas import PageRecord, arrow_schema, validate_job
from schemas.jobs import Limits

ROOT = Path(__file__).resolve().parents[1]
# Names a careless writer might turn into output paths or mistake for its own files.
GOOD = ("a.png", "b.png", "part-0000.parquet.png", "_tmp-1.png", "a b ü.png")


def spec(tiny_checkpoint: Path, inputs: Path, output: Path, **limits) -> dict:
    """An OCR job over tiny images on CPU: one or two generated tokens, small packs, fast commits."""
    return {
        "kind": "ocr_documents",
        "inputs": [str(inputs)],
        "output": str(output),
        "model": str(tiny_checkpoint),
        "dtype": "float32",
        "device": "cpu",
        "target_longest_side": 56,
        "sampling": {"max_new_tokens": 2},
        "resources": {"decode_workers": 1, "cpus_per_decode_worker": 0.5, "gpu_workers": 1,
                      "gpus_per_worker": 0, "max_batch_tokens": 160},
        "limits": limits,
    }  # fmt: skip


def rows_by_name(out: Path) -> dict[str, pd.DataFrame]:
    df = pd.read_parquet(out)
    assert not df.duplicated(["item_id", "page_index"]).any(), "a row was written twice"
    return {Path(uri).name: group.sort_values("page_index") for uri, group in df.groupby("uri")}


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_NAME).read_text())


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory, tiny_checkpoint, ray_local):
    """One job with every per-item fault at once: a GPU worker exits twice after generating the pack that
    holds victim.png; decode crashes on every attempt at doomed.png, once after one page of flaky.pdf, and
    hangs on stuck.png; long.pdf is over the page limit."""
    root = tmp_path_factory.mktemp("faults")
    docs = root / "docs"
    docs.mkdir()
    for name in (*GOOD, "victim.png", "doomed.png", "stuck.png"):
        make_image(docs / name, size=(40, 30))
    make_pdf(docs / "flaky.pdf", pages=3)
    make_pdf(docs / "long.pdf", pages=5)
    limits = {"decode_timeout_s": 5, "decode_retries": 1, "max_pages_per_document": 4}
    job = validate_job(spec(tiny_checkpoint, docs, root / "out", **limits))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_INFER_EXIT_ENV, "victim.png:2")
        mp.setenv(FAULT_EXIT_ENV, "doomed.png:9,flaky.pdf:1:1")
        mp.setenv(FAULT_HANG_ENV, "stuck.png")
        summary = run_job(job, progress=False)
    return job, summary, Path(job.output)


def test_a_gpu_worker_that_dies_mid_batch_is_restarted_and_its_rows_redone(faulty_run):
    job, summary, out = faulty_run
    # Both exits really happened: each is claimed in a file just before the worker's os._exit.
    assert len(list((out / FAULTS_DIR).glob("infer-exit-*"))) == 2
    rows = rows_by_name(out)
    for name in (*GOOD, "victim.png"):
        (row,) = rows[name].itertuples()
        assert row.status == "ok" and row.page_index == 0 and 1 <= row.generated_tokens <= 2, name
        assert row.job_id == summary.job_id


def test_a_decode_crash_is_retried_and_each_page_arrives_once(faulty_run):
    _, _, out = faulty_run
    flaky = rows_by_name(out)["flaky.pdf"]
    assert flaky.page_index.tolist() == [0, 1, 2] and (flaky.status == "ok").all()
    assert flaky.item_id.nunique() == 1


def test_a_decode_that_always_crashes_ends_in_one_error_row(faulty_run):
    _, _, out = faulty_run
    (row,) = rows_by_name(out)["doomed.png"].itertuples()
    assert row.status == "error" and row.error_stage == "decode" and pd.isna(row.page_index)
    assert row.error_message.startswith(
        f"{out.parent / 'docs' / 'doomed.png'}: the decode process crashed on all 2 attempts "
        "(exit code 13; exit code 13)"
    )


def test_a_decode_hang_is_killed_at_the_timeout_and_ends_in_one_error_row(faulty_run):
    _, _, out = faulty_run
    (row,) = rows_by_name(out)["stuck.png"].itertuples()
    assert row.status == "error" and row.error_stage == "decode"
    assert "stuck.png: decode made no progress for 5 s" in row.error_message


def test_a_document_over_the_page_limit_is_one_error_row(faulty_run):
    _, _, out = faulty_run
    (row,) = rows_by_name(out)["long.pdf"].itertuples()
    assert row.status == "error" and row.error_stage == "decode"
    assert "long.pdf: 5 pages selected, over limits.max_pages_per_document=4" in row.error_message


def test_the_faulty_job_accounts_for_every_item_once(faulty_run):
    job, summary, out = faulty_run
    rows = rows_by_name(out)
    assert set(rows) == {*GOOD, "victim.png", "doomed.png", "stuck.png", "flaky.pdf", "long.pdf"}
    m = manifest(out)
    assert m["status"] == "finished" and summary.finished
    ok = len(GOOD) + 1 + 3  # the images, victim.png and flaky.pdf's pages
    assert m["counts"] == {"items": len(rows), "pages": ok + 3, "ok": ok, "errors": 3}
    assert {e["uri"].rsplit("/", 1)[-1] for e in m["errors"]} == {"doomed.png", "stuck.png", "long.pdf"}
    assert summary.run.units == ok + 3 and summary.run.errors == 3


def test_output_file_names_never_come_from_input_names(faulty_run):
    _, _, out = faulty_run
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    allowed = r"part-[0-9a-f]{24}\.parquet|_manifest\.json|_faults/infer-exit-[0-9a-f]{12}-[0-9]+"
    assert names and all(re.fullmatch(allowed, name) for name in names), names


def test_a_batch_that_kills_every_worker_costs_its_items_not_the_job(
    tmp_path, tiny_checkpoint, ray_local, monkeypatch
):
    """Retries are bounded (limits.infer_retries): after them the lost items are error rows, and the next
    run redoes them. Ray retries without end; what bounds them is the count of the pack's starts (Ray's own
    bound also spent retries that reached the worker before its restart was known, and never ran)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("a.png", "poison.png"):
        make_image(docs / name, size=(40, 30))
    out = tmp_path / "out"
    job = validate_job(spec(tiny_checkpoint, docs, out, infer_retries=1, lost_item_passes=0))
    monkeypatch.setenv(FAULT_INFER_EXIT_ENV, "poison.png:50")
    first = run_job(job, progress=False)
    assert len(list((out / FAULTS_DIR).glob("infer-exit-*"))) == 2  # the first attempt and one retry
    rows = rows_by_name(out)
    (row,) = rows["poison.png"].itertuples()
    assert row.status == "error" and row.error_stage == "pipeline"
    assert "poison.png: no result came back" in row.error_message
    assert "started on a GPU worker 2 times and the worker died each time" in row.error_message
    assert "limits.infer_retries=1" in row.error_message and "next run redoes it" in row.error_message
    assert set(rows) == {"a.png", "poison.png"} and first.finished
    # The worker is healthy again: the rerun redoes the lost item and only that.
    monkeypatch.delenv(FAULT_INFER_EXIT_ENV)
    second = run_job(job, progress=False)
    rows = rows_by_name(out)
    assert second.items_processed == first.run.errors >= 1
    assert all((g.status == "ok").all() for g in rows.values()) and set(rows) == {"a.png", "poison.png"}


def test_a_gpu_worker_killed_with_several_packs_in_flight_has_all_of_them_redone(
    tmp_path, tiny_checkpoint, ray_local, monkeypatch
):
    """Every pack travels alone and a worker holds four at once: the worker exits after one of them, and
    the packs it held beside it are redone on the restarted worker, each unit written once."""
    docs = tmp_path / "docs"
    docs.mkdir()
    names = [f"p{i:02d}.png" for i in range(12)]
    for i, name in enumerate(names):
        make_image(docs / name, size=(40, 30), index=i)
    out = tmp_path / "out"
    data = spec(tiny_checkpoint, docs, out)
    data["resources"].update(max_batch_tokens=1, max_packs_in_flight=4)
    monkeypatch.setenv(FAULT_INFER_EXIT_ENV, "p03.png:1:3")  # exit holding three packs, p03's among them
    summary = run_job(validate_job(data), progress=False)
    (claim,) = (out / FAULTS_DIR).glob("infer-exit-*")
    assert json.loads(claim.read_text())["packs_in_flight"] >= 3  # the exit took two other packs with it
    rows = rows_by_name(out)  # also: no unit twice
    assert sorted(rows) == names and summary.finished
    for name in names:
        (row,) = rows[name].itertuples()
        assert row.status == "ok" and 1 <= row.generated_tokens <= 2, name


def test_limits_have_safe_defaults_and_say_what_they_do():
    limits = Limits()
    for name, field in Limits.model_fields.items():
        value = getattr(limits, name)
        assert field.description and len(field.description) > 30, f"limits.{name} is not documented"
        assert value is not None and math.isfinite(value) and value >= 0, f"limits.{name} has no bound"


def test_the_decode_stage_runs_isolated_with_the_jobs_limits(tmp_path, monkeypatch, tiny_checkpoint):
    monkeypatch.setenv(FAULT_EXIT_ENV, "x.pdf:3")
    limits = {"decode_timeout_s": 7, "decode_retries": 4}
    job = validate_job(spec(tiny_checkpoint, tmp_path, tmp_path / "out", **limits))
    decoder = make_decoder(job)()
    try:
        assert isinstance(decoder, IsolatedDecoder)
        assert (decoder.timeout_s, decoder.max_retries) == (7, 4)
        assert decoder.faults.exit == (Fault("x.pdf", 3),) and decoder.faults.hang == ()
        assert decoder.child_pid is None  # the child starts with the first item, one per decode actor
    finally:
        decoder.close()


# ---- the whole job killed -------------------------------------------------------------------------------


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_a_job_killed_halfway_is_finished_by_the_same_command(tmp_path, tiny_checkpoint):
    """`vlbatch run job.yaml` on its own local Ray is SIGKILLed after some files are committed; the same
    command then does only what is missing, and never reads what the killed run left half-written."""
    docs = tmp_path / "docs"
    docs.mkdir()
    # More than one pack window (64 rows), so the first window is committed while one item hangs.
    names = [f"img{i:03d}.png" for i in range(70)] + ["zz-stuck.png"]
    for i, name in enumerate(names):
        make_image(docs / name, size=(32 + i % 5, 24), index=i)
    out = tmp_path / "out"
    job_yaml = tmp_path / "job.yaml"
    job_data = spec(tiny_checkpoint, docs, out, rows_per_file=8)
    job_data["resources"]["decode_workers"] = 2
    job_yaml.write_text(yaml.safe_dump(job_data))
    ray_tmp = tempfile.mkdtemp(prefix="vlbk-", dir="/tmp")  # short: Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "jobs.cli", "run", str(job_yaml), "--no-progress"]
    log = tmp_path / "first.log"
    tree = []
    try:
        # The first run can never finish: one item hangs in decode, so the kill always lands mid-job.
        with open(log, "wb") as sink:
            first = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**env, FAULT_HANG_ENV: "zz-stuck.png"},
                start_new_session=True,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 300
            while len(part_files(out)) < 2:
                assert first.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the first run committed nothing in time"
                tree = descendants(first.pid) or tree
                time.sleep(0.2)
            tree = descendants(first.pid) or tree
            assert any("raylet" in p.name() for p in tree)  # the run's own local Ray
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
            assert first.returncode == -signal.SIGKILL
            # Its local Ray (GCS, raylet, workers, decode children) goes with it.
            deadline = time.monotonic() + 60
            while any(alive(p) for p in tree) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not [p.cmdline() for p in tree if alive(p)], "the killed run left processes behind"
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
            for p in tree:
                if alive(p):
                    p.kill()
        killed = manifest(out)
        assert killed["status"] == "running"  # it never got to say how it ended
        before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in part_files(out)}
        committed = scan_output(out, uri_key="uri").ok_items
        assert 0 < len(committed) < len(names)

        # What a kill during a write leaves: a temporary file. This one holds a well-formed row that would
        # duplicate a committed page if anything read it.
        ghost = pd.read_parquet(next(iter(part_files(out)))).head(1)
        ghost_path = out / f"{TMP_PREFIX}0123456789abcdef-99999.parquet"
        table = pa.Table.from_pandas(ghost, schema=arrow_schema(PageRecord), preserve_index=False)
        pq.write_table(table, ghost_path)

        second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert not ghost_path.exists()
    m = manifest(out)
    run = m["run"]
    assert m["status"] == "finished" and run["job_id"] != killed["job_id"]
    assert run["items_skipped"] == len(committed)
    assert run["items_processed"] == run["pages"] == len(names) - len(committed)
    # Files committed before the kill are untouched; each item has exactly one row; the rows of the items
    # committed before the kill are still the killed run's, the others the second run's.
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in part_files(out)}
    assert {name: after.get(name) for name in before} == before
    df = pd.read_parquet(out)
    assert len(df) == len(names) and df.item_id.is_unique and (df.status == "ok").all()
    assert sorted(Path(u).name for u in df.uri) == sorted(names)
    assert set(df[df.item_id.isin(committed)].job_id) == {killed["job_id"]}
    assert set(df[~df.item_id.isin(committed)].job_id) == {run["job_id"]}
    assert all(re.fullmatch(r"part-[0-9a-f]{24}\.parquet", p.name) for p in part_files(out))


def test_a_stage_that_can_never_start_stops_the_job_at_the_no_progress_bound(
    tmp_path, tiny_checkpoint, ray_local, monkeypatch
):
    """A GPU stage waiting for resources that never come (its node lost, no other has a GPU) ends the job
    after limits.no_progress_timeout_s with what to do; once they are there, the same job finishes."""
    import pipeline.chain
    from pipeline.driver import JobStalled

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        make_image(docs / f"p{i}.png", size=(40, 30), index=i)
    out = tmp_path / "out"
    job = validate_job(spec(tiny_checkpoint, docs, out, no_progress_timeout_s=5))
    # A GPU the session's Ray does not have: the stage's actor can never be placed.
    monkeypatch.setattr(pipeline.chain, "gpus_per_infer_worker", lambda job: 1.0)
    started = time.monotonic()
    with pytest.raises(JobStalled) as stalled:
        run_job(job, progress=False)
    assert time.monotonic() - started < 120
    advice = stalled.value.advice()
    assert "no stage made progress for 5 s (limits.no_progress_timeout_s)" in advice
    assert f"0 of 3 items are committed in {out}" in advice and "Run the same command again" in advice
    assert "Infer" in advice  # the stage that waits is named
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["status"] == manifest["runs"][-1]["status"] == "failed"
    assert "limits.no_progress_timeout_s" in manifest["error"]
    monkeypatch.undo()
    # The default bound: 5 s without a moving block is shorter than the GPU stage's model load here.
    summary = run_job(validate_job(spec(tiny_checkpoint, docs, out)), progress=False)
    rows = rows_by_name(out)
    assert summary.finished and sorted(rows) == ["p0.png", "p1.png", "p2.png"]
    assert all((g.status == "ok").all() for g in rows.values())


def test_the_pack_ledger_allows_each_pack_its_starts_and_names_the_items_it_gave_up(monkeypatch):
    """Plain objects, no Ray: the count the GPU stage consults before it runs a pack."""
    from pipeline.attempts import PackAttempts, PackGivenUp, PackStarts, pack_key

    rows = [{"item_id": "b", "uri": "/d/b.png", "unit_ordinal": 0}, {"item_id": "a", "uri": "s3://x/a.pdf",
            "unit_ordinal": 1}]  # fmt: skip
    assert pack_key(rows) == pack_key(rows[::-1]) != pack_key(rows[:1])
    ledger = PackAttempts(starts_allowed=2)
    assert [ledger.begin(pack_key(rows), ["a", "b"]) for _ in range(3)] == [True, True, False]
    assert ledger.begin(pack_key(rows[:1]), ["b"]) and ledger.items_given_up() == {"a": 2, "b": 2}
    ledger.new_pass()  # the missing items regrouped: every pack has its starts again
    assert ledger.begin(pack_key(rows), ["a", "b"]) and ledger.items_given_up() == {}

    class Remote:  # what a Ray actor handle looks like to the stage, over the same ledger
        def __init__(self, ledger):
            self.begin = type("Method", (), {"remote": staticmethod(ledger.begin)})

    monkeypatch.setattr(ray, "get", lambda value: value)
    starts = PackStarts(Remote(PackAttempts(1)), infer_retries=0)
    starts.check(rows)
    with pytest.raises(PackGivenUp, match=r"2 unit\(s\) \(a.pdf, b.png\) started on a GPU worker 1 time"):
        starts.check(rows)
    PackStarts().check(rows)  # outside Ray: nothing counts
