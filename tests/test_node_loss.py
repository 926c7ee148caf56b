"""Losses on a three-node local cluster (tests/cluster_drill.py, in a network namespace of its own): a worker
node mid-job, the node of the GPU stage, the driver of a submitted job. Each job finishes with exactly one
row per unit, no error rows, within a bound on its wall time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from media import make_pdf, make_video

from pipeline.writer import MANIFEST_NAME

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DRILL = ROOT / "tests" / "cluster_drill.py"
WALL_BOUND_S = 300  # the job, the loss and the work it redoes, on the 2-core CI machine


def can_make_a_network_namespace() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None or shutil.which("ss") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


needs_netns = pytest.mark.skipif(
    not can_make_a_network_namespace(),
    reason="needs unshare(1) (root) for a network namespace of loopback only, and ip(8) and ss(8)",
)


def run_drill(tmp_path: Path, job: dict, kill: str) -> dict:
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    spec = {"job": str(tmp_path / "job.yaml"), "kill": kill, "after_files": 1, "timeout_s": WALL_BOUND_S}
    (tmp_path / "drill.json").write_text(json.dumps(spec))
    result = tmp_path / "result.json"
    inner = f'ip link set lo up && exec "{sys.executable}" "{DRILL}" "{tmp_path / "drill.json"}" "{result}"'
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", inner], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=WALL_BOUND_S + 400,
    )  # fmt: skip
    assert result.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(result.read_text())
    assert "error" not in out, out.get("error", "") + out.get("node_logs", "")
    assert out["listeners"] and out["not_loopback"] == [], f"Ray listens beyond loopback: {out['listeners']}"
    return out


def assert_every_unit_once(out: dict, output: Path, units: int, key: str) -> None:
    tail = out.get("driver_tail", "")[-3000:] + out.get("node_logs", "")
    assert out["killed"] is not None, "the job ended before anything could be lost:\n" + tail
    assert not out.get("timed_out") and out["returncode"] == 0, tail
    assert out["wall_s"] < WALL_BOUND_S, tail
    df = pd.read_parquet(output)
    assert not df.duplicated(["item_id", key]).any(), "a unit was written twice"
    assert len(df) == units and (df.status == "ok").all(), df[["uri", "status", "error_message"]]


# The GPU-stage actor's CPUs are pinned: left to infer_cpus they grow with the machine's cores, and on more
# than 2 a restarted actor would no longer fit beside the CPU stages on the surviving node (NODE_CPUS).
RESOURCES = {"decode_workers": 2, "cpus_per_decode_worker": 0.5, "gpu_workers": 1, "gpus_per_worker": 0,
             "cpus_per_gpu_worker": 2, "max_batch_tokens": 200}  # fmt: skip
LIMITS = {"commit_every_s": 1, "rows_per_file": 3}  # commits early and often: the loss comes mid-job


def job_spec(tmp_path: Path, tiny_checkpoint: Path, kind: str, inputs: Path, **kind_keys) -> dict:
    """A job over `inputs` on the drill's resources; `kind_keys` are what only this kind has."""
    return {
        "kind": kind,
        "inputs": [str(inputs)],
        "output": str(tmp_path / "out"),
        "model": str(tiny_checkpoint),
        "dtype": "float32",
        "device": "cpu",
        "resources": RESOURCES,
        "limits": LIMITS,
        **kind_keys,
    }


def ocr_job(tmp_path: Path, tiny_checkpoint: Path, documents: int = 12) -> tuple[dict, int]:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(documents):
        make_pdf(docs / f"doc{i:02d}.pdf", pages=3)
    ocr = {"target_longest_side": 112, "sampling": {"max_new_tokens": 32}}
    return job_spec(tmp_path, tiny_checkpoint, "ocr_documents", docs, **ocr), 3 * documents


@needs_netns
def test_losing_a_worker_node_mid_ocr_job(tmp_path, tiny_checkpoint):
    job, pages = ocr_job(tmp_path, tiny_checkpoint)
    out = run_drill(tmp_path, job, "worker")
    assert_every_unit_once(out, Path(job["output"]), pages, "page_index")


@needs_netns
def test_losing_the_node_of_the_gpu_stage(tmp_path, tiny_checkpoint):
    job, pages = ocr_job(tmp_path, tiny_checkpoint)
    out = run_drill(tmp_path, job, "infer")
    assert out["killed"] and out["killed"]["node"] in out["infer_hosts"], out.get("infer_hosts")
    assert_every_unit_once(out, Path(job["output"]), pages, "page_index")


@needs_netns
def test_losing_a_worker_node_mid_caption_job(tmp_path, tiny_checkpoint):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(8):
        make_video(videos / f"v{i}.mp4", "h264", n_frames=48, fps=8, size=(64, 48), b_frames=0)
    job = job_spec(
        tmp_path, tiny_checkpoint, "caption_videos", videos, clip_seconds=2.0, min_pixels=28 * 28 * 4,
        max_pixels=28 * 28 * 16, sampling={"max_new_tokens": 16},
    )  # fmt: skip
    out = run_drill(tmp_path, job, "worker")
    assert_every_unit_once(out, Path(job["output"]), 8 * 3, "window_index")  # 6 s videos, 2 s windows


@needs_netns
def test_a_submitted_job_whose_driver_is_killed_is_finished_by_submitting_it_again(tmp_path, tiny_checkpoint):
    job, pages = ocr_job(tmp_path, tiny_checkpoint)
    out = run_drill(tmp_path, job, "driver")
    assert out["first_state"] == "FAILED", out
    assert_every_unit_once(out, Path(job["output"]), pages, "page_index")
    manifest = json.loads((Path(job["output"]) / MANIFEST_NAME).read_text())
    assert manifest["status"] == "finished" and manifest["runs"][-1]["items_skipped"] > 0
