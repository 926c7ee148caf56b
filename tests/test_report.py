"""`vlbatch report`: the HTML page of a job's output, checked as text and rendered in headless Chromium."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from media import make_image, make_random_bytes
from PIL import Image

from jobs.cli import main
from jobs.report import FRAMES_SHOWN, REPORT_NAME, render_report
from pipeline.driver import run_job
from schemas import validate_job

THUMB = re.compile(r'<img class="thumb (frame|page)" alt="[^"]*" src="data:image/jpeg;base64,([^"]+)"')


def manifest(out: str) -> dict:
    return json.loads((Path(out) / "_manifest.json").read_text())


def summary_cells(page: str) -> dict[str, str]:
    return dict(re.findall(r'<td data-key="([^"]+)">([^<]*)</td>', page))


def assert_summary_is_the_manifests(page: str, out: str, unit: str) -> None:
    m, cells = manifest(out), summary_cells(page)
    assert cells["job"] == m["job_id"] and cells["model"] == m["model"]["id"]
    for key in ("items", unit, "ok", "errors"):
        assert cells[key] == str(m["counts"][key])
    for key in ("prompt_tokens", "visual_tokens", "generated_tokens"):
        assert cells[key.replace("_", " ")] == str(m["tokens"][key])
    assert cells["generated tokens/s (last run)"] == str(m["run"]["generated_tokens_per_s"])
    assert cells["wall time (last run), s"] == str(m["run"]["wall_s"])


def thumbnails(page: str, kind: str) -> list[Image.Image]:
    """The page's thumbnails of `kind`, each decoded: every one must be a real JPEG."""
    images = [Image.open(io.BytesIO(base64.b64decode(data))) for k, data in THUMB.findall(page) if k == kind]
    assert all(im.format == "JPEG" and im.size[0] > 0 for im in images)
    return images


def test_caption_report_shows_every_window_with_its_frames(pipeline_runs):
    job, _ = pipeline_runs["caption"]
    df = pd.read_parquet(job.output)
    ok = df[df.status == "ok"]
    page = render_report(job.output, samples=len(df) + 5)

    assert_summary_is_the_manifests(page, job.output, "windows")
    assert page.count('<section class="sample">') == len(ok)
    expected = sum(min(n, FRAMES_SHOWN) for n in ok.frame_count)
    assert len(thumbnails(page, "frame")) == expected and not thumbnails(page, "page")
    assert "changed since the run" not in page and 'class="missing"' not in page
    for row in ok.itertuples():  # each caption, escaped, and the timestamps of its first frame
        assert html.escape(row.text) in page
        assert f"{row.frame_timestamps[0]:.2f} s</span>" in page
    assert page.count('<tr class="error-group">') == 0 and "no errors" in page
    assert page.count("<svg") == 4  # visual and generated tokens, finish reasons, throughput


def test_ocr_report_shows_pages_beside_their_text(pipeline_runs):
    job, _ = pipeline_runs["ocr"]
    df = pd.read_parquet(job.output)
    ok = df[df.status == "ok"]
    page = render_report(job.output, samples=3)

    assert_summary_is_the_manifests(page, job.output, "pages")
    assert page.count('<section class="sample">') == 3 == len(thumbnails(page, "page"))
    assert not thumbnails(page, "frame")
    shown = re.findall(r'<h3 title="([^"]+)">[^<]* — page (\d+) of', page)
    for uri, number in shown:
        (row,) = ok[(ok.uri == html.unescape(uri)) & (ok.page_number == int(number))].itertuples()
        assert html.escape(row.text) in page
        if isinstance(row.text_layer, str) and row.text_layer:
            assert html.escape(row.text_layer) in page


@pytest.fixture(scope="module")
def report_with_errors(tmp_path_factory, pipeline_corpus, ray_local):
    """A small OCR job with two bad files, whose one good source is deleted after the run."""
    root = tmp_path_factory.mktemp("report-errors")
    docs = root / "docs"
    docs.mkdir()
    make_image(docs / "kept.png", size=(120, 90))
    gone = make_image(docs / "gone.png", size=(90, 120), index=3)
    make_random_bytes(docs / "bad.pdf")
    (docs / "empty.pdf").write_bytes(b"")
    job = validate_job({**pipeline_corpus["ocr"], "inputs": [str(docs)], "output": str(root / "out")})
    run_job(job, progress=False)
    gone.unlink()
    assert main(["report", job.output, "--samples", "10"]) == 0
    return job, (Path(job.output) / REPORT_NAME)


def test_report_groups_errors_and_shows_a_gone_source_as_missing(report_with_errors):
    job, path = report_with_errors
    page = path.read_text()
    df = pd.read_parquet(job.output)
    errors = df[df.status == "error"]
    assert len(errors) == 2 and set(errors.error_stage) == {"decode"}

    assert_summary_is_the_manifests(page, job.output, "pages")
    files = re.findall(r'<li class="error-file">([^<]*)</li>', page)
    assert sorted(html.unescape(f) for f in files) == sorted(errors.uri)
    groups = page.count('<tr class="error-group">')
    assert 1 <= groups <= len(errors)
    for message in errors.error_message:  # each message is there, with the file's path taken out
        uri = errors[errors.error_message == message].uri.iloc[0]
        assert html.escape(message.replace(uri, "FILE")) in page

    gone = str(Path(job.output).parent / "docs" / "gone.png")
    assert f"missing: {html.escape(gone)} is no longer there" in page
    assert len(thumbnails(page, "page")) == 1  # kept.png, rendered again


def console_errors(page: Path, png: Path, profile: Path) -> list[str]:
    """Render `page` to `png` in headless Chromium; the messages its console printed."""
    command = [
        shutil.which("chromium") or "chromium",
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",  # never the shared default profile
        "--window-size=1200,1600",
        f"--screenshot={png}",
        "--enable-logging=stderr",
        "--v=0",
        page.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium (make test installs it)")
def test_report_renders_in_chromium_without_console_errors(report_with_errors, tmp_path):
    # The check sees console errors at all: a broken page reports one.
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>console.error('boom'); missing();</script></body></html>")
    assert console_errors(broken, tmp_path / "broken.png", tmp_path / "profile-a")

    _, path = report_with_errors
    png = tmp_path / "report.png"
    assert console_errors(path, png, tmp_path / "profile-b") == []
    image = Image.open(png).convert("RGB")
    assert image.size == (1200, 1600)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 1  # None: more colours than counted
