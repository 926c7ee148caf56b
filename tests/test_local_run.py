"""A newcomer's machine: a local run is local whatever `ray start` left behind, a dead cluster address fails
at once, and what a person causes (Ctrl-C, a wrong --out, a bad flag) ends in one line, not a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from media import cpu_overrides

from jobs.cli import main
from pipeline.chain import PACK_WINDOW_ROWS

VLBATCH = Path(sys.executable).parent / "vlbatch"
ROOT = Path(__file__).resolve().parent.parent
CPU_FLAGS = [f"--set={o}" for o in cpu_overrides()]


@pytest.fixture
def ray_tmpdir():
    """A Ray temporary root of the test's own (short: Ray's socket paths must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vlbt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def clean_env(ray_tmpdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VLBATCH_FAULT"))}
    return {**env, "RAY_TMPDIR": str(ray_tmpdir), **extra}


def caption_cmd(pipeline_corpus, out: Path, *inputs: str) -> list[str]:
    videos = pipeline_corpus["root"] / "videos"
    paths = [str(videos / name) for name in inputs] or [str(videos)]
    return [str(VLBATCH), "caption-videos", *paths, "--out", str(out), "--model",
            pipeline_corpus["caption"]["model"], "--no-progress", *CPU_FLAGS]


def test_a_dead_cluster_address_fails_at_once(tmp_path, pipeline_corpus, ray_tmpdir):
    cmd = caption_cmd(pipeline_corpus, tmp_path / "out", "a.mp4")
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=clean_env(ray_tmpdir, RAY_ADDRESS="127.0.0.1:1"))
    assert time.monotonic() - started < 60  # imports included; Ray itself would retry for ever
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no Ray cluster answers at 127.0.0.1:1" in proc.stderr and "unset RAY_ADDRESS" in proc.stderr
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=clean_env(ray_tmpdir, RAY_ADDRESS="auto"))
    assert proc.returncode == 2 and "no `ray start` cluster is recorded" in proc.stderr, proc.stderr[-3000:]


def test_an_output_that_is_a_file_is_refused_with_a_message(tmp_path, pipeline_corpus, capsys):
    taken = tmp_path / "results.parquet"
    taken.write_bytes(b"not a directory")
    assert main(caption_cmd(pipeline_corpus, taken, "a.mp4")[1:]) == 2
    err = capsys.readouterr().err
    assert f"{taken}: the output must be a directory" in err and "Traceback" not in err
    assert taken.read_bytes() == b"not a directory"


def test_errors_carry_the_command_prefix_once(tmp_path, capsys):
    argv = ["caption-videos", "x.mp4", "--out", str(tmp_path), "--model", "m", "--set", "fps=-1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlbatch caption-videos: error: invalid job spec") and "fps" in err
    assert err.count("vlbatch caption-videos") == 1


def leave_a_stale_ray_start_record(ray_tmpdir: Path) -> None:
    """What `ray start` killed without `ray stop` leaves: its address, where nothing listens."""
    (ray_tmpdir / "ray").mkdir(exist_ok=True)
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")


@pytest.mark.slow
def test_ctrl_c_commits_what_is_done_says_so_and_the_rerun_resumes(tmp_path, pipeline_corpus, ray_tmpdir):
    """Also: both runs are local whatever a killed `ray start` left behind; neither waits on its address."""
    leave_a_stale_ray_start_record(ray_tmpdir)
    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    source = pipeline_corpus["root"] / "videos" / "a.mp4"
    # More rows than one pack window, so packs leave while the last video's decoder hangs: the run cannot
    # end before the Ctrl-C, yet commits the items that came through.
    for k in range(PACK_WINDOW_ROWS + 6):
        shutil.copy(source, videos / f"v{k:03d}.mp4")
    shutil.copy(source, videos / "zz_hangs.mp4")
    items = PACK_WINDOW_ROWS + 7
    cmd = [str(VLBATCH), "caption-videos", str(videos), "--out", str(out), "--model",
           pipeline_corpus["caption"]["model"], "--no-progress", *CPU_FLAGS,
           "--set=limits.commit_every_s=0.5", "--set=resources.decode_workers=2"]
    env = clean_env(ray_tmpdir, VLBATCH_FAULT_DECODE_HANG="zz_hangs:1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert list(out.glob("part-*.parquet")), "nothing was committed"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground group
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    committed = pd.read_parquet(out).item_id.nunique()
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"vlbatch caption-videos: interrupted; {committed} of {items} items are committed")
    assert "run the same command again to resume" in last and 0 < committed < items
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["runs"][-1]["status"] == "interrupted"

    env = clean_env(ray_tmpdir)
    started = time.monotonic()
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert time.monotonic() - started < 240  # Ray would wait minutes on the stale address
    df = pd.read_parquet(out)
    assert (df.status == "ok").all() and df.item_id.nunique() == items
    assert not df.duplicated(["item_id", "window_index"]).any()
    runs = json.loads((out / "_manifest.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["interrupted", "finished"]
    assert runs[1]["items_skipped"] == committed
