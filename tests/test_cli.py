"""The `vlbatch` command line: jobs built from flags or YAML, errors that name the file, a real run."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from media import cpu_overrides

from jobs.cli import _job_from_args, build_parser, main
from jobs.submit import absolute_paths, decode_spec, encode_spec, resolve_address
from schemas import CaptionVideosJob, OcrDocumentsJob

VLBATCH = Path(sys.executable).parent / "vlbatch"


def job_of(argv: list[str]):
    return _job_from_args(build_parser().parse_args(argv))


def test_commands_without_a_spec_file():
    job = job_of(
        [
            "caption-videos",
            "a.mp4",
            "clips/",
            "--out",
            "o",
            "--model",
            "m",
            "--set",
            "fps=1.5",
            "--set",
            "resources.gpu_workers=3",
        ]
    )
    assert isinstance(job, CaptionVideosJob)
    assert job.inputs == ["a.mp4", "clips/"] and job.output == "o" and job.model == "m"
    assert job.fps == 1.5 and job.resources.gpu_workers == 3
    job = job_of(["ocr-documents", "scan.pdf", "--out", "o", "--model", "m", "--prompt", "Transcribe."])
    assert isinstance(job, OcrDocumentsJob) and job.prompt == "Transcribe."


def test_run_spec_with_overrides(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump({"kind": "ocr_documents", "inputs": ["x"], "output": "o", "model": "m"}))
    job = job_of(["run", str(spec), "--set", "dpi=150", "--set", "sampling.max_new_tokens=9"])
    assert job.dpi == 150 and job.sampling.max_new_tokens == 9


@pytest.mark.parametrize(
    "spec, fragment",
    [
        (None, "cannot read the job spec"),
        ({"kind": "ocr_documents", "inputs": ["x"], "output": "o", "model": "m", "colour": 1}, "colour"),
        ({"kind": "caption_videos", "inputs": ["x"], "output": "o", "model": "m", "fps": -1}, "fps"),
    ],
)
def test_spec_errors_name_the_file(tmp_path, capsys, spec, fragment):
    path = tmp_path / "job.yaml"
    if spec is not None:
        path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and fragment in err


def test_missing_input_fails_before_any_work(tmp_path, capsys, tiny_checkpoint):
    missing = tmp_path / "nope.pdf"
    argv = ["ocr-documents", str(missing), "--out", str(tmp_path / "o"), "--model", str(tiny_checkpoint)]
    assert main(argv) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_submit_needs_an_address(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["status", "raysubmit_x"]) == 2
    assert "--address" in capsys.readouterr().err
    assert resolve_address("127.0.0.1:8265") == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert resolve_address(None) == "http://head:8265"


def test_submitted_spec_travels_whole_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = job_of(
        [
            "caption-videos",
            "clips/*.mp4",
            "s3://bucket/v.mp4",
            "--out",
            "out",
            "--model",
            "ckpt",
            "--set",
            "clip_seconds=30",
        ]
    )
    sent = decode_spec(encode_spec(absolute_paths(job)))
    assert sent.inputs == [str(tmp_path / "clips/*.mp4"), "s3://bucket/v.mp4"]
    assert sent.output == str(tmp_path / "out") and sent.model == str(tmp_path / "ckpt")
    assert sent.clip_seconds == 30 and sent.kind == job.kind


def test_console_script_is_installed():
    out = subprocess.run([str(VLBATCH), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("run", "caption-videos", "ocr-documents", "plan", "submit", "status", "logs"):
        assert command in out


def test_ocr_documents_command_runs_a_job(tmp_path, capsys, pipeline_corpus, ray_local):
    docs = pipeline_corpus["root"] / "docs"
    out = tmp_path / "out"
    argv = [
        "ocr-documents",
        str(docs / "f.pdf"),
        str(docs / "h.jpg"),
        "--out",
        str(out),
        "--model",
        pipeline_corpus["ocr"]["model"],
        "--no-progress",
    ]
    overrides = cpu_overrides(max_new_tokens=3)
    assert main(argv + [a for o in overrides for a in ("--set", o)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("vlbatch ocr_documents: 2 items") and "3 pages: 3 ok, 0 errors" in line
    df = pd.read_parquet(out)
    assert len(df) == 3 and (df.generated_tokens <= 3).all()
    assert json.loads((out / "_manifest.json").read_text())["counts"]["pages"] == 3


def test_local_ray_listens_on_loopback_only():
    """Every port of a Ray that vlbatch starts is bound to 127.0.0.1 (checked in a child process, so the
    session's own Ray is left alone)."""
    code = (
        "import os, ray\n"
        "import psutil  # the copy ray ships\n"
        "from jobs.run import connect_ray\n"
        "connect_ray()\n"
        "pids = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}\n"
        "ips = {c.laddr.ip for c in psutil.net_connections('inet')\n"
        "       if c.status == 'LISTEN' and c.pid in pids}\n"
        "print(sorted(ips))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ips = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert ips and set(ips) <= {"127.0.0.1", "::ffff:127.0.0.1"}
