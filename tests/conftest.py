"""Shared fixtures. Nothing here downloads: transformers is kept offline for the whole session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The Triton decode kernel runs on the CPU through Triton's interpreter, which is chosen when a kernel is
# defined: before any test imports model.engine.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Made-up credentials of the tests' S3 server (moto accepts any). Every Ray worker of the session gets them,
# as a node's workers get its credentials in real use; the endpoint and region reach the workers through
# the job (pipeline.storage.worker_env), as they do in real use.
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "vlbatch-test-key",
    "AWS_SECRET_ACCESS_KEY": "vlbatch-test-secret",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata endpoint that is not there
}
S3_REGION = "us-east-1"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random tiny Qwen2-VL checkpoint in the published layout, with the real Qwen2 tokenizer."""
    from model.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray per test session, bound to 127.0.0.1; more logical CPUs than cores so that the
    pipeline's actor pools (each asking for a fraction of a CPU) can never starve one another."""
    import ray

    from jobs.run import loopback_only

    temp_dir = None
    if not ray.is_initialized():
        loopback_only()
        # A temporary directory of its own (short: Ray's socket paths must stay under 108 bytes), so what
        # other Ray clusters on the machine left in /tmp/ray never matters; address="local": never join one.
        temp_dir = tempfile.mkdtemp(prefix="vlbt-ray-", dir="/tmp")
        ray.init(
            address="local",
            num_cpus=8,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            _temp_dir=temp_dir,
            runtime_env={"env_vars": S3_CREDENTIALS},
        )
    yield ray
    ray.shutdown()
    if temp_dir is not None:
        shutil.rmtree(temp_dir, ignore_errors=True)


# Media of the pipeline tests: (encoder, frames, fps, (width, height), B-frames). b.avi lasts 5 s, so
# 2-second windows cut it in three; the others fit one window.
PIPELINE_VIDEOS = {
    "a.mp4": ("h264", 48, 24, (96, 64), 2),
    "b.avi": ("mpeg4", 60, 12, (64, 48), 2),
    "c.webm": ("libvpx-vp9", 30, 15, (160, 120), 0),
    "d.mkv": ("hevc", 36, 24, (112, 80), 2),
}
PIPELINE_PDFS = {
    "e.pdf": {"pages": 3, "image_only_pages": (1,)},
    "f.pdf": {"pages": 2, "page_size": (300.0, 420.0)},
}
PIPELINE_IMAGES = {"g.png": (300, 200), "h.jpg": (60, 90)}  # g.png is downscaled to the target side


@pytest.fixture(scope="session")
def pipeline_corpus(tmp_path_factory, tiny_checkpoint) -> dict:
    """Videos, PDFs and images for end-to-end runs, plus job specs (as dicts) over them."""
    from media import make_image, make_pdf, make_video

    root = tmp_path_factory.mktemp("pipeline-corpus")
    (root / "videos").mkdir()
    (root / "docs").mkdir()
    for name, (codec, frames, fps, size, b_frames) in PIPELINE_VIDEOS.items():
        make_video(root / "videos" / name, codec, n_frames=frames, fps=fps, size=size, b_frames=b_frames)
    for name, kwargs in PIPELINE_PDFS.items():
        make_pdf(root / "docs" / name, **kwargs)
    for name, size in PIPELINE_IMAGES.items():
        make_image(root / "docs" / name, size=size)
    common = {
        "model": str(tiny_checkpoint),
        "dtype": "float32",
        "device": "cpu",
        "sampling": {"max_new_tokens": 4},
        # Fractions of a CPU per actor: the pools fit beside each other on a 2-core machine.
        "resources": {"decode_workers": 1, "cpus_per_decode_worker": 0.5, "gpu_workers": 1,
                      "gpus_per_worker": 0, "max_batch_tokens": 160},
    }
    caption = {**common, "kind": "caption_videos", "inputs": [str(root / "videos")],
               "output": str(root / "out-videos"), "clip_seconds": 2.0, "min_pixels": 28 * 28 * 4,
               "max_pixels": 28 * 28 * 16}
    ocr = {**common, "kind": "ocr_documents", "inputs": [str(root / "docs")],
           "output": str(root / "out-docs"), "target_longest_side": 224}
    return {"root": root, "caption": caption, "ocr": ocr}


@pytest.fixture(scope="session")
def pipeline_runs(pipeline_corpus, ray_local) -> dict:
    """Both jobs run once over the corpus, on the session's local Ray: {kind: (job, summary)}."""
    from pipeline.driver import run_job
    from schemas import validate_job

    runs = {}
    for kind in ("caption", "ocr"):
        job = validate_job(pipeline_corpus[kind])
        runs[kind] = (job, run_job(job, progress=False))
    return runs


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1 for the session: its endpoint URL."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


class S3:
    """The test's view of the S3 server: a boto3 client (tests only) to make buckets and put objects."""

    def __init__(self, endpoint: str):
        import boto3

        self.endpoint = endpoint
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=S3_REGION,
            aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def bucket(self, name: str) -> str:
        """Create bucket `name` (empty) if it is not there; returns its s3:// URI."""
        existing = {b["Name"] for b in self.client.list_buckets().get("Buckets", [])}
        if name not in existing:
            self.client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload(self, local_dir: Path, bucket: str, prefix: str) -> str:
        """Every file under `local_dir` as objects under s3://bucket/prefix/; returns that URI."""
        self.bucket(bucket)
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(local_dir).as_posix()}"
                self.client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        return f"s3://{bucket}/{prefix}/"

    def keys(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """{key: ETag} under a prefix."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3:
    """The S3 server, with this process's environment pointing at it as a user's would (endpoint,
    region, credentials); restored after the test."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_DEFAULT_REGION", S3_REGION)
    for key, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    return S3(s3_server)


def pytest_collection_modifyitems(session, config, items):
    """The longest work first, each file's tests in their order: under `pytest -n 2 --dist loadfile` the
    files sharing `pipeline_runs` (one unit, see below) start first, then the files with slow tests, and the
    short ones fill in after, so neither worker is left with a long file at the end. Of the tests run alone,
    the slow ones (the cluster drills, which mostly wait on Ray) go first, beside the Chromium install."""
    shared = {item.path for item in items if "pipeline_runs" in getattr(item, "fixturenames", ())}
    slow = {item.path for item in items if item.get_closest_marker("slow")}

    def order(item):
        alone_and_quick = bool(item.get_closest_marker("alone")) and not item.get_closest_marker("slow")
        return item.path not in shared, item.path not in slow, alone_and_quick

    items.sort(key=order)  # a stable sort: apart from these keys, each file keeps its tests' order


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, except that the files using `pipeline_runs` go to one worker together, so the two
    jobs of that session fixture run once, not once in each worker; units go out in collection order."""
    if config.getoption("dist", None) != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # xdist's default hands out the units with most tests first

    class SharedRunsScheduling(LoadFileScheduling):
        uses: dict[str, bool] = {}

        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            if path not in self.uses:
                file = config.rootpath / path
                self.uses[path] = file.is_file() and "pipeline_runs" in file.read_text()
            return "pipeline_runs" if self.uses[path] else path

    return SharedRunsScheduling(config, log)
