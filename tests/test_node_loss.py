"""Losses on a three-node local cluster (tests/cluster_drill.py, in a network namespace of its own), each in
the middle of a job: a worker node of the CPU stages during a caption job, the worker node of the GPU stage
(and of CPU stages beside it) during an OCR job, the driver of a submitted job. Each job finishes with
exactly one row per unit, no error rows, within a bound on its wall time.

The drills run one after the other on one cluster, which gets a new worker node after each loss: its
start-up, not the drills, was most of their time. They run with nothing beside them (`make test`): on the
2-core CI machine a cluster's three raylets beside another test's Ray took minutes to start a job."""

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

pytestmark = [pytest.mark.slow, pytest.mark.alone]

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


def run_drills(root: Path, jobs: dict[str, tuple[dict, str]]) -> dict[str, dict]:
    """Each (job, what to kill) of `jobs` as a drill on one cluster; the result of each by name."""
    drills = {}
    for name, (job, kill) in jobs.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(job))
        drills[name] = {"job": str(root / f"{name}.yaml"), "kill": kill, "after_files": 1,
                        "timeout_s": WALL_BOUND_S}  # fmt: skip
    (root / "drills.json").write_text(json.dumps({"drills": drills}))
    results = root / "results.json"
    inner = f'ip link set lo up && exec "{sys.executable}" "{DRILL}" "{root / "drills.json"}" "{results}"'
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", inner], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=len(jobs) * (WALL_BOUND_S + 200),
    )  # fmt: skip
    assert results.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(results.read_text())


def checked(out: dict) -> dict:
    """A drill's result, once it ran and Ray listened on loopback only."""
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
# than 2 a restarted actor would no longer fit beside the CPU stages on the surviving node (WORKER_CPUS).
RESOURCES = {"decode_workers": 2, "cpus_per_decode_worker": 0.5, "gpu_workers": 1, "gpus_per_worker": 0,
             "cpus_per_gpu_worker": 2, "max_batch_tokens": 200}  # fmt: skip
LIMITS = {"commit_every_s": 1, "rows_per_file": 3}  # commits early and often: the loss comes mid-job


def job_spec(root: Path, tiny_checkpoint: Path, kind: str, inputs: Path, **kind_keys) -> dict:
    """A job over `inputs` on the drill's resources, output in `root`; `kind_keys`: what only its kind has."""
    return {
        "kind": kind,
        "inputs": [str(inputs)],
        "output": str(root / "out"),
        "model": str(tiny_checkpoint),
        "dtype": "float32",
        "device": "cpu",
        "resources": RESOURCES,
        "limits": LIMITS,
        **kind_keys,
    }


def ocr_job(root: Path, tiny_checkpoint: Path, documents: int = 12) -> tuple[dict, int]:
    docs = root / "docs"
    docs.mkdir(parents=True)
    for i in range(documents):
        make_pdf(docs / f"doc{i:02d}.pdf", pages=3)
    ocr = {"target_longest_side": 112, "sampling": {"max_new_tokens": 32}}
    return job_spec(root, tiny_checkpoint, "ocr_documents", docs, **ocr), 3 * documents


def caption_job(root: Path, tiny_checkpoint: Path) -> tuple[dict, int]:
    videos = root / "videos"
    videos.mkdir(parents=True)
    for i in range(8):
        make_video(videos / f"v{i}.mp4", "h264", n_frames=48, fps=8, size=(64, 48), b_frames=0)
    job = job_spec(
        root, tiny_checkpoint, "caption_videos", videos, clip_seconds=2.0, min_pixels=28 * 28 * 4,
        max_pixels=28 * 28 * 16, sampling={"max_new_tokens": 16},
    )  # fmt: skip
    return job, 8 * 3  # 6 s videos, 2 s windows


# name: (job builder, what the drill kills). The submitted job goes last: it loses no node.
DRILLS = {
    "worker-caption": (caption_job, "worker"),
    "infer-node-ocr": (ocr_job, "infer"),
    "driver": (ocr_job, "driver"),
}


@pytest.fixture(scope="module")
def drills(tmp_path_factory, tiny_checkpoint) -> dict[str, tuple[dict, dict, int]]:
    """Every drill run once, on one cluster: name -> (job, result, units)."""
    root = tmp_path_factory.mktemp("drills")
    built = {name: (*make(root / name, tiny_checkpoint), kill) for name, (make, kill) in DRILLS.items()}
    results = run_drills(root, {name: (job, kill) for name, (job, _, kill) in built.items()})
    return {name: (job, results[name], units) for name, (job, units, _) in built.items()}


@needs_netns
def test_losing_a_worker_node_mid_caption_job(drills):
    job, out, windows = drills["worker-caption"]
    checked(out)
    hosts = out["infer_hosts"]  # found, so that the node lost is known to be one of CPU stages only
    assert out["killed"] and hosts and out["killed"]["node"] not in hosts, hosts
    assert_every_unit_once(out, Path(job["output"]), windows, "window_index")


@needs_netns
def test_losing_the_worker_node_of_the_gpu_stage_mid_ocr_job(drills):
    job, out, pages = drills["infer-node-ocr"]
    checked(out)
    assert out["killed"] and out["killed"]["node"] in out["infer_hosts"], out.get("infer_hosts")
    assert_every_unit_once(out, Path(job["output"]), pages, "page_index")


@needs_netns
def test_a_submitted_job_whose_driver_is_killed_is_finished_by_submitting_it_again(drills):
    job, out, pages = drills["driver"]
    assert checked(out)["first_state"] == "FAILED", out
    assert_every_unit_once(out, Path(job["output"]), pages, "page_index")
    manifest = json.loads((Path(job["output"]) / MANIFEST_NAME).read_text())
    assert manifest["status"] == "finished" and manifest["runs"][-1]["items_skipped"] > 0
