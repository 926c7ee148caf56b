"""The progress line of a run, and a healthy run that prints nothing else (no Ray status blocks, warnings)."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from media import cpu_overrides

from pipeline import progress
from pipeline.progress import ProgressLine

VLBATCH = Path(sys.executable).parent / "vlbatch"
# Ray 2.60 prints this error line once per process for every Ray Data actor pool, with no switch to turn
# it off (ray-project/ray#57733); it is the one line a healthy run still shows.
PROGRESS = re.compile(r"^(ocr_documents: items |  (decode|prepare|infer) +)")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def rows(n: int, status: str = "ok", stage: str | None = None) -> list[dict]:
    return [{"status": status, "error_stage": stage} for _ in range(n)]


def last_block(text: str) -> list[str]:
    """The lines a terminal shows at the end: the last block drawn, without the control sequences."""
    return [ln.replace("\x1b[K", "") for ln in text.rstrip("\n").split("\r")[-1].split("\n")]


def test_on_a_terminal_the_block_is_redrawn_in_place():
    out = Terminal()
    line = ProgressLine("ocr_documents", 3, "pages", stream=out)
    line.show()  # one line before Ray reports any stage
    line.rows(rows(2))
    line.item(rows(2))
    line.rows(rows(1, "error", "decode"))
    line.item(rows(1, "error", "decode"))
    line.stage("decode", 3, 4)
    line.stage("infer", 4, 3)
    line.show()
    line.close()
    text = out.getvalue()
    assert text.startswith("\r") and text.endswith("\n")
    assert "\x1b[2F" in text  # the block of three lines is redrawn from its first line
    head, decode, infer = last_block(text)
    assert head.startswith("ocr_documents: items 2/3 | pages 3 | ")
    assert "pages/s" in head and "errors 1 (decode 1)" in head
    assert decode.startswith("  decode   items 3/3 in | pages 4 out | ")
    assert infer.startswith("  infer    pages 3 out | ")


def test_in_a_log_the_block_is_appended_at_intervals(monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.05)
    out = io.StringIO()
    line = ProgressLine("caption_videos", 2, "windows", stream=out)
    line.rows(rows(4))
    line.item(rows(4))
    deadline = time.monotonic() + 30
    while "windows 4" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    printed_before_close = out.getvalue()
    line.close()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert "caption_videos: items 1/2 | windows 4 | " in printed_before_close
    assert out.getvalue().splitlines()[-1].startswith("caption_videos: items 1/2 | windows 4 | ")


def test_stage_lines_count_ray_datas_rows(pipeline_corpus, ray_local, tmp_path, capsys):
    """Ray Data's executor reports each stage's rows: at the end, every item went into decode and every
    page came out of infer."""
    from pipeline.driver import run_job
    from schemas import validate_job

    docs = pipeline_corpus["root"] / "docs"
    inputs = [str(docs / "f.pdf"), str(docs / "h.jpg")]
    job = validate_job({**pipeline_corpus["ocr"], "inputs": inputs, "output": str(tmp_path / "out")})
    summary = run_job(job, progress=True)
    out = capsys.readouterr().out.splitlines()
    end = out.index(summary.line())
    head, decode, prepare, infer = out[end - 4 : end]
    assert head.startswith("ocr_documents: items 2/2 | pages 3 | ")
    assert decode.startswith("  decode   items 2/2 in | pages 3 out | ")
    assert prepare.startswith("  prepare  pages 3 out | ")
    assert infer.startswith("  infer    pages 3 out | ")


def test_a_healthy_run_prints_its_summary_and_no_ray_noise(tmp_path, pipeline_corpus):
    """The CLI as a user runs it, in a child process with a Ray of its own (never the session's)."""
    docs = pipeline_corpus["root"] / "docs"
    overrides = cpu_overrides()
    command = [str(VLBATCH), "ocr-documents", str(docs / "h.jpg"), "--out", str(tmp_path / "out")]
    command += ["--model", pipeline_corpus["ocr"]["model"]]
    command += [a for o in overrides for a in ("--set", o)]
    ray_dir = tempfile.mkdtemp(prefix="vlb-ray-", dir="/tmp")  # short: Ray's socket paths have a limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_dir
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    summary = [ln for ln in printed if ln.startswith("vlbatch ocr_documents: 1 items")]
    assert len(summary) == 1 and "1 pages: 1 ok, 0 errors" in summary[0]
    others = [
        ln
        for ln in printed
        if ln not in summary and not PROGRESS.match(ln)
    ]
    assert others == []


def test_the_stderr_filter_drops_only_rays_known_line_and_keeps_a_crash():
    """Lines written to fd 2 by C code pass through, but for Ray's one known line; what a dying process
    writes last (its faulthandler traceback) still comes out."""
    script = (
        "import faulthandler, os\n"
        "from pipeline.progress import drop_ray_noise\n"
        "drop_ray_noise(verbose=False)\n"
        "os.write(2, b'[2026-12-03 06:00:17,437 E 8029 8029] core_worker.cc:2465: Actor with class name: "
        "\\'MapWorker(MapBatches(DecodeUnits))\\' and ID: \\'689d\\' has constructor arguments in the object "
        "store and max_restarts > 0. If the arguments go out of scope, the restart fails.\\n')\n"
        "os.write(2, b'a line of C\\n')\n"
        "import sys; print('a Python warning', file=sys.stderr, flush=True)\n"
        "faulthandler.enable(); faulthandler._sigsegv()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert lines[:2] == ["a line of C", "a Python warning"]
    assert "Fatal Python error: Segmentation fault" in done.stderr
    assert "constructor arguments" not in done.stderr
