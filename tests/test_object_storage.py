"""s3:// in and out, against a real S3-compatible server (moto) on 127.0.0.1: the writer's commit and lock on
an object store, the start-up errors, and caption / OCR jobs that read from and write to it."""

from __future__ import annotations

import json
import os
import socket
import urllib.request
import uuid

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_cluster import ray_head  # noqa: F401 (the fixture: a local Ray head for the cluster test)

from pipeline import lock as lock_mod
from pipeline import storage
from pipeline.lock import LOCK_NAME, OutputLock
from pipeline.sources import expand_inputs
from pipeline.storage import ConditionalWritesUnsupported, OutputDir, PreconditionFailed
from pipeline.writer import (
    MANIFEST_NAME,
    DatasetWriter,
    drop_items,
    part_files,
    read_json,
    scan_output,
    write_json_atomic,
)

SCHEMA = pa.schema([("item_id", pa.string()), ("unit_index", pa.int64()), ("source_uri", pa.string()),
                    ("status", pa.string())])


def rows(item: str, n: int, status: str = "ok") -> list[dict]:
    uri = f"/in/{item}"
    out = [{"item_id": item, "unit_index": k, "source_uri": uri, "status": status} for k in range(n)]
    out[-1]["units_total"] = n
    return out


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_writer_commits_whole_files_under_final_names_and_resumes_by_listing(s3):
    out = s3.bucket(unique("out")) + "/run/"
    writer = DatasetWriter(out, SCHEMA, rows_per_file=4)
    for item in ("a", "b", "c"):
        writer.add(rows(item, 2))
    writer.add(rows("d", 1, status="error"))
    writer.flush()
    files = part_files(out)
    assert len(files) == 2 and all(f.startswith(out) for f in files)
    bucket = out.split("/")[2]
    assert all(k.split("/")[-1].startswith("part-") for k in s3.keys(bucket)), "no temporary objects"
    state = scan_output(out)
    assert state.ok_items == {"a", "b", "c"} and state.error_items == {"d"}
    # A retry of the same items reproduces the same name (and content): nothing is ever there twice.
    again = DatasetWriter(out, SCHEMA, rows_per_file=4)
    for item in ("a", "b"):
        again.add(rows(item, 2))
    again.flush()
    assert part_files(out) == files
    assert drop_items(scan_output(out), {"a", "d"}) == 3
    table = pq.read_table(out)
    assert sorted(table.column("item_id").to_pylist()) == ["b", "b", "c", "c"]


def test_json_round_trips_and_is_never_left_half_written(s3):
    out = s3.bucket(unique("out")) + "/x"
    write_json_atomic(f"{out}/{MANIFEST_NAME}", {"status": "running"})
    write_json_atomic(f"{out}/{MANIFEST_NAME}", {"status": "finished"})
    assert read_json(f"{out}/{MANIFEST_NAME}") == {"status": "finished"}
    assert read_json(f"{out}/_nothing.json") is None


def test_lock_refuses_a_second_run_and_takes_over_dead_or_stale_ones(s3, monkeypatch):
    monkeypatch.setattr(lock_mod, "LOCK_SETTLE_S", 0.05)
    out = s3.bucket(unique("out")) + "/locked"
    loc = OutputDir.of(out)
    with OutputLock(out):
        with pytest.raises(ValueError, match=r"another vlbatch run .* is writing here; wait for it"):
            OutputLock(out).__enter__()
    assert loc.read_bytes(LOCK_NAME) is None  # released on exit

    def plant(holder: dict) -> None:
        loc.write_bytes(LOCK_NAME, json.dumps(holder).encode())

    # A run on another machine with a fresh heartbeat is alive; one whose heartbeat stopped is not.
    import time

    plant({"host": "elsewhere", "pid": 1, "token": "t", "heartbeat_at": time.time()})
    with pytest.raises(ValueError, match="elsewhere"):
        OutputLock(out).__enter__()
    plant({"host": "elsewhere", "pid": 1, "token": "t", "heartbeat_at": time.time() - 10 * 3600})
    with OutputLock(out) as lock:
        assert json.loads(loc.read_bytes(LOCK_NAME))["token"] == lock.token
    # A killed process of this host is taken over at once, as with the local lock.
    plant({"host": socket.gethostname(), "pid": 2**22 + 12345, "token": "t", "heartbeat_at": time.time()})
    with OutputLock(out):
        pass


def test_a_run_whose_lock_was_taken_over_stops_before_its_next_commit(s3, monkeypatch):
    monkeypatch.setattr(lock_mod, "LOCK_SETTLE_S", 0.05)
    monkeypatch.setattr(lock_mod, "LOCK_HEARTBEAT_S", 0.1)
    out = s3.bucket(unique("out")) + "/taken"
    loc = OutputDir.of(out)
    with OutputLock(out) as lock:
        thief = {"host": "elsewhere", "pid": 7, "token": "other", "heartbeat_at": 0}
        loc.write_bytes(LOCK_NAME, json.dumps(thief).encode())
        import time

        deadline = time.monotonic() + 10
        while lock.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        writer = DatasetWriter(out, SCHEMA)
        writer.add(rows("a", 1))
        with pytest.raises(ValueError, match="took over the output lock"):
            writer.flush()
        with pytest.raises(ValueError, match="took over the output lock"):  # nor the manifest
            write_json_atomic(f"{out}/{MANIFEST_NAME}", {"status": "failed"})
    assert part_files(out) == []
    assert json.loads(loc.read_bytes(LOCK_NAME))["token"] == "other"  # the other run's lock is left alone


def test_the_lock_is_a_conditional_put_so_a_run_that_misses_a_live_lock_is_still_refused(s3, monkeypatch):
    """Two runs that both look before either writes: without conditions both would see no lock. Here the
    second run is made blind to the first one's lock, and the store's `If-None-Match: *` still refuses it,
    leaving the first run's lock as it was."""
    monkeypatch.setattr(lock_mod, "LOCK_SETTLE_S", 0.05)
    out = s3.bucket(unique("out")) + "/race"
    loc = OutputDir.of(out)
    assert loc.conditional
    with OutputLock(out) as first:
        before = s3.keys(loc.path.split("/")[0])
        blind = OutputLock(out)
        monkeypatch.setattr(blind, "_holder", lambda: None)
        with pytest.raises(ValueError, match=r"another vlbatch run .* is writing here"):
            blind.__enter__()
        assert json.loads(loc.read_bytes(LOCK_NAME))["token"] == first.token
        assert s3.keys(loc.path.split("/")[0]) == before  # not even rewritten
        assert first.lost is None


def test_of_two_runs_taking_over_one_dead_lock_only_one_wins(s3, monkeypatch):
    monkeypatch.setattr(lock_mod, "LOCK_SETTLE_S", 0.05)
    out = s3.bucket(unique("out")) + "/takeover"
    loc = OutputDir.of(out)
    dead = {"host": "elsewhere", "pid": 1, "token": "dead", "heartbeat_at": 0}
    loc.write_bytes(LOCK_NAME, json.dumps(dead).encode())
    seen_by_both = loc.read_versioned(LOCK_NAME)
    with OutputLock(out) as winner:
        # The loser read the dead lock before the winner replaced it: its `If-Match` on that ETag fails,
        # it looks again and finds the winner alive.
        loser = OutputLock(out)
        real = loser.out.read_versioned
        views = iter([seen_by_both])
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(OutputDir, "read_versioned", lambda self, name: next(views, None) or real(name))
            with pytest.raises(ValueError, match=r"another vlbatch run .* is writing here"):
                loser.__enter__()
        assert json.loads(loc.read_bytes(LOCK_NAME))["token"] == winner.token
    assert loc.read_bytes(LOCK_NAME) is None  # the winner released it


def test_a_new_part_file_never_replaces_an_object_of_its_name(s3):
    out = s3.bucket(unique("out")) + "/parts"
    loc = OutputDir.of(out)
    etag = loc.write_bytes("x.bin", b"one", if_absent=True)
    with pytest.raises(PreconditionFailed):
        loc.write_bytes("x.bin", b"two", if_absent=True)
    newer = loc.write_bytes("x.bin", b"two", if_etag=etag)
    with pytest.raises(PreconditionFailed):
        loc.write_bytes("x.bin", b"three", if_etag=etag)  # that version is gone
    assert loc.read_versioned("x.bin") == (b"two", newer)
    with pytest.raises(PreconditionFailed):
        loc.delete("x.bin", if_etag=etag)  # an old version: the object stays
    assert loc.read_bytes("x.bin") == b"two"
    loc.delete("x.bin", if_etag=newer)
    assert loc.read_bytes("x.bin") is None

    first = DatasetWriter(out, SCHEMA)
    first.add(rows("a", 2))
    name = first.flush().rsplit("/", 1)[1]
    again = DatasetWriter(out, SCHEMA)  # the same items, the same bytes: a retried upload is fine
    again.add(rows("a", 2))
    again.flush()
    other = DatasetWriter(out, SCHEMA)  # the same name with other content: another writer's file
    other.add(rows("a", 2, status="error"))
    with pytest.raises(ValueError, match=rf"{name}: another run committed this file"):
        other.flush()
    assert set(pq.read_table(f"{loc.path}/{name}", filesystem=loc.fs).column("status").to_pylist()) == {"ok"}


def test_a_store_without_conditional_writes_gets_the_best_effort_lock(s3, monkeypatch):
    """An S3-compatible store that answers 501 to `If-None-Match` is remembered as one without conditions;
    the lock then checks, writes and reads back, and still refuses a second run."""
    import botocore.stub

    monkeypatch.setattr(lock_mod, "LOCK_SETTLE_S", 0.05)
    monkeypatch.setattr(storage, "_NO_CONDITIONS", set())
    bucket = unique("plain")
    out = s3.bucket(bucket) + "/out"
    loc = OutputDir.of(out)
    with botocore.stub.Stubber(storage.s3_client()) as stub:
        stub.add_client_error("put_object", "NotImplemented", "A header you provided implies "
                              "functionality that is not implemented", 501)
        with pytest.raises(ConditionalWritesUnsupported):
            loc.write_bytes(LOCK_NAME, b"{}", if_absent=True)
    assert not loc.conditional and OutputDir.of(s3.bucket(unique("other"))).conditional
    with OutputLock(out) as lock:
        assert lock._etag is None
        assert json.loads(loc.read_bytes(LOCK_NAME))["token"] == lock.token
        with pytest.raises(ValueError, match=r"another vlbatch run .* is writing here"):
            OutputLock(out).__enter__()
        writer = DatasetWriter(out, SCHEMA)  # plain uploads for the part files
        writer.add(rows("a", 1))
        writer.flush()
    assert loc.read_bytes(LOCK_NAME) is None
    assert len(part_files(out)) == 1


def test_inputs_expand_from_directories_globs_and_manifests(s3, tmp_path):
    for name in ("a.mp4", "sub/b.mkv", "sub/.hidden.mp4", "notes.txt.bak"):
        (tmp_path / "m" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "m" / name).write_bytes(b"x" * 10)
    (tmp_path / "m" / "list.txt").write_text("a.mp4\n# comment\nsub/b.mkv\n")
    bucket = unique("media")
    base = s3.upload(tmp_path / "m", bucket, "v")
    uris = lambda inputs: [it.uri for it in expand_inputs(inputs, "video")]  # noqa: E731
    expected = [f"{base}a.mp4", f"{base}sub/b.mkv"]
    assert uris([base]) == expected
    assert uris([f"{base}**/*.m*"]) == expected
    assert uris([f"{base}list.txt"]) == expected
    with pytest.raises(ValueError, match=rf"{base}nope.mp4 does not exist"):
        expand_inputs([f"{base}nope.mp4"], "video")


# --- start-up errors -------------------------------------------------------------------------------------


def test_missing_bucket_fails_at_start_naming_it(s3):
    missing = r"bucket 'no-such-bucket-vlb' does not exist at http://127\.0\.0\.1:\d+; create it"
    with pytest.raises(ValueError, match=rf"output s3://no-such-bucket-vlb/out: {missing}"):
        OutputLock("s3://no-such-bucket-vlb/out").__enter__()
    with pytest.raises(ValueError, match=rf"input s3://no-such-bucket-vlb/in/: {missing}"):
        expand_inputs(["s3://no-such-bucket-vlb/in/"], "video")


def test_unreachable_endpoint_fails_fast_naming_it(s3, monkeypatch):
    import time

    dead = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    started = time.monotonic()
    with pytest.raises(ValueError, match=rf"output s3://bkt/out: cannot reach the endpoint {dead}; check "
                                         "AWS_ENDPOINT_URL or the spec's storage.endpoint_url"):
        OutputLock("s3://bkt/out").__enter__()
    assert time.monotonic() - started < 60  # bounded retries, no endless loop (a bound, not a timing)


PRIVATE = "vlbatch-private"


@pytest.fixture
def auth_enforced(s3):
    """The S3 server checks credentials (moto's IAM mode) for the test: a user with no rights at all, and
    a bucket `PRIVATE` that exists."""
    import boto3

    s3.bucket(PRIVATE)
    iam = boto3.client("iam", endpoint_url=s3.endpoint, region_name="us-east-1",
                       aws_access_key_id="x", aws_secret_access_key="x")
    user = unique("nobody")
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]

    def set_auth(count: str) -> None:
        request = urllib.request.Request(f"{s3.endpoint}/moto-api/reset-auth", data=count.encode(),
                                         method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()

    set_auth("0")
    try:
        yield key
    finally:
        set_auth("inf")


def test_access_denied_fails_at_start_naming_the_uri_and_credentials(s3, auth_enforced, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", auth_enforced["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", auth_enforced["SecretAccessKey"])
    with pytest.raises(ValueError, match=r"output s3://.*: access denied; give the job's credentials "
                                         r"\(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"):
        OutputLock(f"s3://{PRIVATE}/out").__enter__()
    with pytest.raises(ValueError, match=rf"input s3://{PRIVATE}/in/: access denied"):
        expand_inputs([f"s3://{PRIVATE}/in/"], "video")
    secret = auth_enforced["SecretAccessKey"]
    try:
        OutputLock(f"s3://{PRIVATE}/out").__enter__()
    except ValueError as e:
        assert secret not in str(e)


def test_credentials_in_a_uri_are_refused():
    with pytest.raises(ValueError, match="credentials in a URI"):
        expand_inputs(["s3://KEY:SECRET@bucket/in/"], "video")


def test_object_read_back_with_pandas_and_pyarrow(s3):
    out = s3.bucket(unique("out")) + "/pd"
    writer = DatasetWriter(out, SCHEMA)
    writer.add(rows("a", 3))
    writer.flush()
    write_json_atomic(f"{out}/{MANIFEST_NAME}", {"status": "finished"})
    assert len(pd.read_parquet(out)) == 3  # the manifest and lock (leading "_") are not read as data
    assert pq.read_table(out).num_rows == 3
    assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint


# --- whole jobs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_corpus(s3_server, pipeline_corpus) -> str:
    """The pipeline corpus uploaded to the S3 server, plus a broken PDF: the corpus' s3:// URI."""
    from conftest import S3
    from media import make_random_bytes

    s3 = S3(s3_server)
    root = pipeline_corpus["root"]
    base = s3.upload(root / "videos", "vlbatch-media", "corpus/videos")
    s3.upload(root / "docs", "vlbatch-media", "corpus/docs")
    broken = root / "broken"
    broken.mkdir(exist_ok=True)
    make_random_bytes(broken / "zz-broken.pdf", 3000)
    s3.upload(broken, "vlbatch-media", "corpus/broken")
    return base.removesuffix("videos/")


def test_caption_job_reads_and_writes_s3_and_a_rerun_does_no_work(
    s3, s3_corpus, pipeline_corpus, ray_local, monkeypatch, capsys
):
    from conftest import PIPELINE_VIDEOS, S3_CREDENTIALS

    from pipeline.driver import run_job
    from schemas import validate_job

    # The endpoint from the job spec this time, not from the environment: the workers get it too.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    bucket = unique("captions")
    out = s3.bucket(bucket) + "/run/"
    spec = {**pipeline_corpus["caption"], "inputs": [f"{s3_corpus}videos/"], "output": out,
            "storage": {"endpoint_url": s3.endpoint}}
    job = validate_job(spec)
    summary = run_job(job, progress=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # for the readers below
    df = pd.read_parquet(out)
    assert summary.finished and summary.run.errors == 0, df[df.status == "error"].error_message.tolist()
    assert set(df.uri) == {f"{s3_corpus}videos/{name}" for name in PIPELINE_VIDEOS}
    assert (df.status == "ok").all() and not df.duplicated(["item_id", "window_index"]).any()
    assert len(df) == summary.totals["units"] == summary.run.units == pq.read_table(out).num_rows
    manifest = read_json(f"{out}{MANIFEST_NAME}")
    assert manifest["status"] == "finished" and manifest["counts"]["windows"] == len(df)
    keys = s3.keys(bucket)
    assert f"run/{LOCK_NAME}" not in keys  # released
    # Only results and the manifest (and the empty "run/" marker pyarrow keeps when it deletes a file).
    assert all(k.startswith(("run/part-", f"run/{MANIFEST_NAME}")) or k == "run/" for k in keys), keys
    # No secret in the manifest, a row or a log line.
    secret = S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
    logged = capsys.readouterr()
    texts = (json.dumps(manifest), df.to_json(date_format="iso"), logged.out, logged.err)
    assert all(secret not in text for text in texts)

    def no_ray():
        raise AssertionError("a rerun over a finished output must not start any work")

    again = run_job(job, progress=False, connect=no_ray)
    assert again.items_processed == 0 and again.items_skipped == len(PIPELINE_VIDEOS)
    after = s3.keys(bucket)
    parts = {k: v for k, v in keys.items() if "part-" in k}
    assert {k: v for k, v in after.items() if "part-" in k} == parts  # not one part file rewritten


def test_ocr_job_on_s3_turns_a_broken_object_into_an_error_row(s3, s3_corpus, pipeline_corpus, ray_local):
    from conftest import PIPELINE_IMAGES, PIPELINE_PDFS

    from pipeline.driver import run_job
    from schemas import validate_job

    out = s3.bucket(unique("pages")) + "/ocr"
    broken = f"{s3_corpus}broken/zz-broken.pdf"
    job = validate_job({**pipeline_corpus["ocr"], "inputs": [f"{s3_corpus}docs/", broken], "output": out})
    summary = run_job(job, progress=False)
    df = pd.read_parquet(out)
    pages = sum(spec["pages"] for spec in PIPELINE_PDFS.values()) + len(PIPELINE_IMAGES)
    assert len(df) == pages + 1 and summary.totals["errors"] == 1
    bad = df[df.status == "error"]
    assert bad.uri.tolist() == [broken] and bad.error_stage.tolist() == ["decode"]
    assert bad.error_message.iloc[0].startswith(broken)
    assert (df[df.uri != broken].status == "ok").all()
    assert read_json(f"{out}/{MANIFEST_NAME}")["errors"][0]["uri"] == broken


def test_decoders_stream_from_s3_what_they_can_read_as_a_stream(s3, tmp_path, monkeypatch):
    """An image is read by Pillow straight from the object (the plan of a JPEG reads one block, its
    header); a video too big for the temporary disk is streamed into PyAV, frame for frame as its
    local decode; neither leaves a temporary file."""
    import tempfile

    import numpy as np
    from media import make_video

    from pipeline.decode import files
    from pipeline.decode.documents import DocumentConfig, iter_document_pages, page_sizes
    from pipeline.decode.video import decode_video, probe_video
    from pipeline.decode.windows import VideoDecodeConfig

    local = tmp_path / "media"
    local.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (900, 1200, 3), dtype=np.uint8)).save(local / "noise.jpg")
    make_video(local / "clip.mp4", n_frames=60, size=(96, 64), b_frames=2)
    base = s3.upload(local, unique("stream"), "in")
    monkeypatch.setattr(files, "STREAM_BLOCK_BYTES", 64 << 10)
    reads: list[int] = []  # blocks fetched from the store (not those served from the stream's cache)
    real_block = files.ObjectStream._block

    def counted_block(self, index):
        if index not in self._blocks:
            reads.append(index)
        return real_block(self, index)

    monkeypatch.setattr(files.ObjectStream, "_block", counted_block)
    temp_before = set(os.listdir(tempfile.gettempdir()))

    cfg = DocumentConfig(target_longest_side=256)
    assert page_sizes(f"{base}noise.jpg", cfg) == page_sizes(str(local / "noise.jpg"), cfg)
    # The plan reads the header only: one block of a file bigger than the whole block cache.
    assert reads == [0] and (local / "noise.jpg").stat().st_size > 4 * files.STREAM_BLOCK_BYTES
    (page,) = iter_document_pages(f"{base}noise.jpg", cfg)
    (local_page,) = iter_document_pages(str(local / "noise.jpg"), cfg)
    assert np.array_equal(page["pixels"], local_page["pixels"])

    reads.clear()
    full = type("Usage", (), {"free": files.TEMP_HEADROOM_BYTES})  # nothing fits the temporary disk
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: full)
    vcfg = VideoDecodeConfig(fps=6.0, clip_seconds=1.0, backend="pyav")
    assert probe_video(f"{base}clip.mp4").frame_count == 60
    remote = list(decode_video(f"{base}clip.mp4", vcfg))
    here = list(decode_video(str(local / "clip.mp4"), vcfg))
    assert reads and len(remote) == len(here) > 1
    for a, b in zip(remote, here):
        assert a["frame_indices"] == b["frame_indices"] and np.array_equal(a["pixels"], b["pixels"])
    assert set(os.listdir(tempfile.gettempdir())) - temp_before == set()


def test_plan_reads_s3_inputs_and_a_missing_output_prefix_as_empty(s3, s3_corpus, pipeline_corpus):
    from conftest import PIPELINE_IMAGES, PIPELINE_PDFS

    from jobs.plan import plan_job
    from schemas import validate_job

    out = s3.bucket(unique("plan")) + "/not-yet"
    job = validate_job({**pipeline_corpus["ocr"], "inputs": [f"{s3_corpus}docs/"], "output": out})
    totals = plan_job(job).totals()
    assert totals["items"] == len(PIPELINE_PDFS) + len(PIPELINE_IMAGES)
    assert totals["pages"] == sum(spec["pages"] for spec in PIPELINE_PDFS.values()) + len(PIPELINE_IMAGES)


def test_job_start_errors_name_the_output_and_the_fix(s3, pipeline_corpus, monkeypatch):
    from pipeline.driver import run_job
    from schemas import validate_job

    def no_ray():
        raise AssertionError("a job whose output is unusable must not start any work")

    spec = {**pipeline_corpus["ocr"], "output": "s3://no-such-bucket-vlb/out"}
    with pytest.raises(ValueError, match="output s3://no-such-bucket-vlb/out: bucket 'no-such-bucket-vlb'"):
        run_job(validate_job(spec), progress=False, connect=no_ray)
    dead = f"http://127.0.0.1:{closed_port()}"
    spec = {**pipeline_corpus["ocr"], "output": "s3://bkt/out", "storage": {"endpoint_url": dead}}
    with pytest.raises(ValueError, match=f"output s3://bkt/out: cannot reach the endpoint {dead}"):
        run_job(validate_job(spec), progress=False, connect=no_ray)
    assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint  # the spec's endpoint applied for that job only


# --- a killed job, and a cluster, on S3 -----------------------------------------------------------------


@pytest.mark.slow
def test_a_job_killed_halfway_on_s3_is_finished_by_the_same_command(s3, tmp_path, tiny_checkpoint):
    """`vlbatch run` with inputs and output on S3 is SIGKILLed after some files are committed; the same
    command takes over the dead run's lock, does only what is missing, and leaves one row per page."""
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    import yaml
    from media import make_image
    from test_faults import ROOT, alive, descendants, spec

    from pipeline.faults import FAULT_HANG_ENV

    docs = tmp_path / "docs"
    docs.mkdir()
    names = [f"img{i:03d}.png" for i in range(70)] + ["zz-stuck.png"]  # more than one pack window
    for i, name in enumerate(names):
        make_image(docs / name, size=(32 + i % 5, 24), index=i)
    bucket = unique("killed")
    inputs = s3.upload(docs, bucket, "in")
    out = f"s3://{bucket}/out"
    job_yaml = tmp_path / "job.yaml"
    job_yaml.write_text(yaml.safe_dump(spec(tiny_checkpoint, inputs, out, rows_per_file=8)))
    ray_tmp = tempfile.mkdtemp(prefix="vlbs-", dir="/tmp")  # short: Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the S3 endpoint and credentials
    env.update(RAY_TMPDIR=ray_tmp, HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "jobs.cli", "run", str(job_yaml), "--no-progress"]
    log = tmp_path / "first.log"
    tree = []
    try:
        with open(log, "wb") as sink:  # one item hangs in decode: the kill always lands mid-job
            first = subprocess.Popen(command, cwd=ROOT, env={**env, FAULT_HANG_ENV: "zz-stuck.png"},
                                     start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while len(part_files(out)) < 2:
                assert first.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the first run committed nothing in time"
                tree = descendants(first.pid) or tree
                time.sleep(0.5)
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
                first.wait()
            for p in tree:
                if alive(p):
                    p.kill()
        assert f"out/{LOCK_NAME}" in s3.keys(bucket)  # the killed run never released its lock
        killed = read_json(f"{out}/{MANIFEST_NAME}")
        before = s3.keys(bucket, "out/part-")
        committed = scan_output(out, uri_key="uri").ok_items
        assert 0 < len(committed) < len(names)
        second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    m = read_json(f"{out}/{MANIFEST_NAME}")
    assert m["status"] == "finished" and m["run"]["job_id"] != killed["job_id"]
    assert m["run"]["items_skipped"] == len(committed)
    after = s3.keys(bucket, "out/part-")
    assert {k: after.get(k) for k in before} == before  # files committed before the kill are untouched
    df = pd.read_parquet(out)
    assert len(df) == len(names) and df.item_id.is_unique and (df.status == "ok").all()
    assert sorted(u.rsplit("/", 1)[1] for u in df.uri) == sorted(names)
    assert f"out/{LOCK_NAME}" not in s3.keys(bucket)


@pytest.mark.slow
def test_submit_to_a_ray_cluster_with_inputs_and_output_on_s3(
    s3, s3_corpus, ray_head, pipeline_corpus, tmp_path  # noqa: F811 (s3 first: the head inherits its env)
):
    """`vlbatch submit` to a local head started with the S3 endpoint and credentials in its environment."""
    import sys

    import yaml
    from test_cluster import vlbatch

    address, env = ray_head
    bucket = unique("cluster")
    out = s3.bucket(bucket) + "/out"
    inputs = [f"{s3_corpus}docs/e.pdf", f"{s3_corpus}docs/g.png"]
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump({**pipeline_corpus["ocr"], "inputs": inputs, "output": out}))
    sub = vlbatch(["submit", str(spec_path), "--address", address, "--python", sys.executable, "--wait"], env)
    job_id = sub.stdout.split()[0] if sub.stdout else ""
    logs = vlbatch(["logs", job_id, "--address", address], env).stdout if job_id else ""
    assert sub.returncode == 0, f"{sub.stdout}\n{sub.stderr[-3000:]}\n{logs[-3000:]}"
    assert f"{job_id}: SUCCEEDED" in sub.stdout
    df = pd.read_parquet(out)
    assert len(df) == 3 + 1 and (df.status == "ok").all() and set(df.uri) == set(inputs)
    assert read_json(f"{out}/{MANIFEST_NAME}")["status"] == "finished"
