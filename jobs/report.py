"""`vlbatch report OUT`: one self-contained HTML page to review a job's output by looking at it.

Summary (from `_manifest.json`), errors grouped by stage and message, token and finish-reason histograms,
throughput over time, and a sample of units beside what the model wrote. Frames and pages are decoded again
from the sources with the job's own settings and decoders (decode is frame-exact: they are what the model
saw). Images are small base64 JPEGs and plots are inline SVG: no server, no network, no script.

One module past 400 lines on purpose: it is one page, section by section, and each section's reading of
the output sits beside the HTML it becomes.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from PIL import Image

from pipeline.writer import MANIFEST_NAME, part_files
from schemas import CaptionVideosJob, JobSpecError, validate_job

REPORT_NAME = "_report.html"  # `_`: vlbatch's own file, ignored by Parquet readers of the output
FILES_PER_ERROR = 50  # files listed under one error message
FRAMES_SHOWN = 8  # per window, spread over its sampled frames
FRAME_SIDE, PAGE_SIDE = 160, 420  # longest side of the thumbnails, pixels
SUMMARY_COLUMNS = [
    "item_id", "uri", "status", "error_stage", "error_message", "visual_tokens", "generated_tokens",
    "finish_reason", "created_at",
]  # fmt: skip


def e(value: Any) -> str:
    """Text for HTML: every value from the output or a source goes through here."""
    return html.escape("" if value is None else str(value))


def jpeg_data_uri(pixels: np.ndarray, side: int, quality: int = 75) -> str:
    """A uint8 HxWx3 image as a data: URI of a JPEG whose longest side is at most `side`."""
    image = Image.fromarray(np.ascontiguousarray(pixels))
    image.thumbnail((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def thumb(pixels: np.ndarray, kind: str, side: int, alt: str) -> str:
    return f'<img class="thumb {kind}" alt="{e(alt)}" src="{jpeg_data_uri(pixels, side)}">'


# ---------------------------------------------------------------- reading the output


def load_output(out_dir: str | Path) -> tuple[dict[str, Any], pads.Dataset | None]:
    """(manifest, the committed Parquet files as one dataset, None if none yet); ValueError naming the
    directory when it holds no job output."""
    if "://" in str(out_dir):
        raise ValueError(f"{out_dir}: the report reads a local output directory; copy the output here first")
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ValueError(f"{out_dir}: no {MANIFEST_NAME}; give the --out directory of a vlbatch job")
    manifest = json.loads(manifest_path.read_text())
    files = part_files(out_dir)
    return manifest, pads.dataset([str(f) for f in files], format="parquet") if files else None


def error_groups(rows: list[dict[str, Any]]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """Error rows grouped by (stage, message with its own file's path taken out), biggest group first."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        message = (row.get("error_message") or "").replace(row.get("uri") or "\0", "FILE")
        groups[(row.get("error_stage") or "?", message)].append(row)
    return sorted(((s, m, r) for (s, m), r in groups.items()), key=lambda g: (-len(g[2]), g[0], g[1]))


def pick_samples(ok: np.ndarray, n: int) -> list[int]:
    """Row indices of `n` ok units (`ok`: a mask over the rows) spread evenly over the output."""
    rows = np.flatnonzero(ok)
    if n <= 0 or len(rows) == 0:
        return []
    if len(rows) <= n:
        return rows.tolist()
    return [int(rows[k * len(rows) // n]) for k in range(n)]


# ---------------------------------------------------------------- plots (inline SVG)


def svg_bars(title: str, labels: list[str], counts: list[int], width: int = 340, height: int = 150) -> str:
    """A bar chart with a label under each bar and its count above it."""
    if not counts:
        return f'<figure class="plot"><figcaption>{e(title)}</figcaption><p class="none">no data</p></figure>'
    top, bottom, left = 18, 34, 8
    plot_h, step = height - top - bottom, (width - 2 * left) / len(counts)
    peak = max(counts) or 1
    parts = []
    for k, (label, count) in enumerate(zip(labels, counts)):
        h = plot_h * count / peak
        x = left + k * step
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{top + plot_h - h:.1f}" width="{max(step - 2, 1):.1f}" '
            f'height="{h:.1f}" fill="#4a78b5"><title>{e(label)}: {count}</title></rect>'
        )
        if len(counts) <= 16 or k % math.ceil(len(counts) / 8) == 0:
            y = height - bottom + 14
            parts.append(f'<text x="{x + step / 2:.1f}" y="{y}" text-anchor="middle">{e(label)}</text>')
        if count:
            y = top + plot_h - h - 3
            parts.append(f'<text x="{x + step / 2:.1f}" y="{y:.1f}" text-anchor="middle">{count}</text>')
    return (
        f'<figure class="plot"><figcaption>{e(title)}</figcaption>'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img">'
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - left}" y2="{top + plot_h}" stroke="#888"/>'
        f"{''.join(parts)}</svg></figure>"
    )


def histogram(title: str, values: np.ndarray, bins: int = 12) -> str:
    """Bars of a numeric column: one per value when there are few, else equal-width bins."""
    if len(values) == 0:
        return svg_bars(title, [], [])
    distinct, counts = np.unique(values.astype(np.int64), return_counts=True)
    if len(distinct) <= bins:
        return svg_bars(title, [str(v) for v in distinct], counts.tolist())
    lo, hi = int(distinct[0]), int(distinct[-1])
    width = math.ceil((hi - lo + 1) / bins)
    binned = np.bincount(np.minimum((values.astype(np.int64) - lo) // width, bins - 1), minlength=bins)
    return svg_bars(
        title, [f"{lo + k * width}–{lo + (k + 1) * width - 1}" for k in range(bins)], binned.tolist()
    )


def throughput_plot(
    seconds: np.ndarray, t0: dt.datetime | None, unit: str, width: int = 1040, height: int = 150
) -> str:
    """Units finished over time (rows' created_at, in seconds from the run's start `t0`): the slope is the
    throughput. The curve is sampled at a few hundred instants, however many rows there are."""
    title = f"throughput: {unit} finished over time"
    if len(seconds) == 0 or t0 is None:
        return svg_bars(title, [], [])
    seconds = np.sort(seconds)
    span = max(float(seconds[-1]), 1e-3)
    total = len(seconds)
    title += f" (mean {total / span:.3g} {unit}/s over {span:.1f} s)"
    top, bottom, left, right = 16, 30, 52, 12
    plot_w, plot_h = width - left - right, height - top - bottom
    at = np.linspace(0.0, span, 400)
    done = np.searchsorted(seconds, at, side="right")
    points = " ".join(
        f"{left + plot_w * t / span:.1f},{top + plot_h * (1 - n / total):.1f}" for t, n in zip(at, done)
    )
    axis = (
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" stroke="#888"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#888"/>'
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{total}</text>'
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>'
        f'<text x="{left}" y="{height - 8}">{e(t0.strftime("%Y-%m-%d %H:%M:%S"))} UTC</text>'
        f'<text x="{width - right}" y="{height - 8}" text-anchor="end">+{span:.1f} s</text>'
    )
    return (
        f'<figure class="plot wide"><figcaption>{e(title)}</figcaption>'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img">{axis}'
        f'<polyline fill="none" stroke="#c0502e" stroke-width="2" points="{points}"/>'
        "</svg></figure>"
    )


def finish_times(table: pa.Table, started: str | None) -> tuple[np.ndarray, dt.datetime | None]:
    """(seconds from t0 at which each row was written, t0): t0 is the last run's start, or the first row
    when an earlier run wrote rows too."""
    stamps = table.column("created_at").drop_null()
    if len(stamps) == 0:
        return np.zeros(0), None
    micros = pc.cast(stamps, pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy()
    first = dt.datetime.fromtimestamp(int(micros.min()) / 1e6, dt.UTC)
    t0 = min(first, dt.datetime.fromisoformat(started)) if started else first
    return (micros - t0.timestamp() * 1e6) / 1e6, t0


# ---------------------------------------------------------------- sampled units, decoded again


def _unreadable(uri: str, error: Exception) -> str:
    """'missing' for a source that is gone, else why it could not be read again (never a report error)."""
    message = str(error)
    if "no such file" in message.lower() or isinstance(error, FileNotFoundError):
        return f'<div class="missing">missing: {e(uri)} is no longer there</div>'
    return f'<div class="missing">could not read the source again: {e(message)}</div>'


def video_previews(job: CaptionVideosJob, rows: list[dict[str, Any]]) -> dict[int, str]:
    """Frames of each sampled window, decoded again from its video; keyed by the row's position in `rows`."""
    from pipeline.decode.video import decode_video
    from pipeline.decode.windows import VideoDecodeConfig

    cfg = VideoDecodeConfig.from_job(job)
    by_uri: dict[str, dict[int, int]] = defaultdict(dict)
    for k, row in enumerate(rows):
        by_uri[row["uri"]][row["window_index"]] = k
    previews: dict[int, str] = {}
    for uri, wanted in by_uri.items():
        try:
            for window in decode_video(uri, cfg):
                k = wanted.get(window["window_index"])
                if k is not None:
                    previews[k] = frame_strip(window, rows[k])
                if len(previews.keys() & set(wanted.values())) == len(wanted):
                    break
        except Exception as err:  # a source gone or changed since the run: the report says so and goes on
            for k in wanted.values():
                previews.setdefault(k, _unreadable(uri, err))
    return previews


def frame_strip(window: dict[str, Any], row: dict[str, Any]) -> str:
    frames, stamps = window["pixels"], window["frame_timestamps"]
    picks = sorted({round(i * (len(frames) - 1) / max(FRAMES_SHOWN - 1, 1)) for i in range(FRAMES_SHOWN)})
    if len(frames) <= FRAMES_SHOWN:
        picks = list(range(len(frames)))
    cells = "".join(
        f'<div class="frame">{thumb(frames[i], "frame", FRAME_SIDE, f"frame at {stamps[i]:.2f} s")}'
        f"<span>{stamps[i]:.2f} s</span></div>"
        for i in picks
    )
    note = ""
    expected = row.get("frame_timestamps")
    if expected is not None and not np.allclose(expected, stamps, atol=1e-3):
        note = '<p class="missing">the video changed since the run: these frames differ from the model\'s</p>'
    shown = f"{len(picks)} of {len(frames)} sampled frames" if len(picks) < len(frames) else "sampled frames"
    return f'<div class="frames">{cells}</div><p class="meta">{shown}</p>{note}'


def page_previews(job: Any, rows: list[dict[str, Any]]) -> dict[int, str]:
    """Each sampled page rendered again from its document, as the model was given it."""
    from pipeline.decode.documents import DocumentConfig, iter_document_pages

    previews: dict[int, str] = {}
    for k, row in enumerate(rows):
        number = row["page_index"] + 1
        cfg = DocumentConfig.from_job(job, page_ranges=str(number))
        try:
            pages = iter_document_pages(row["uri"], cfg)
            page = next(p for p in pages if p.get("page_index") == row["page_index"])
            if page["status"] != "ok":
                raise ValueError(page["error_message"])
            previews[k] = thumb(page["pixels"], "page", PAGE_SIDE, f"page {number}")
        except Exception as err:
            previews[k] = _unreadable(row["uri"], err)
    return previews


def sample_section(manifest: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p class='none'>no finished units to show</p>"
    try:
        job = validate_job(manifest["spec"], source=MANIFEST_NAME)
    except (JobSpecError, KeyError) as err:
        return f'<p class="missing">cannot rebuild the job\'s decode settings: {e(err)}</p>'
    video = isinstance(job, CaptionVideosJob)
    previews = video_previews(job, rows) if video else page_previews(job, rows)
    cards = []
    for k, row in enumerate(rows):
        name = Path(row["uri"]).name
        if video:
            where = (
                f"window {row['window_index'] + 1} of {row['num_windows']}, "
                f"{row['start_s']:.2f}–{row['end_s']:.2f} s"
            )
            texts = f'<h4>caption</h4><pre class="text">{e(row.get("text"))}</pre>'
            if row.get("fields") is not None:
                texts += f'<h4>fields</h4><pre class="fields">{e(json.dumps(row["fields"], indent=1))}</pre>'
            elif row.get("fields_valid") is False:
                texts += '<p class="missing">the answer is not a valid object (cut at max_new_tokens?)</p>'
        else:
            where = f"page {row['page_number']} of {row['page_count']}"
            texts = f'<h4>OCR text</h4><pre class="text">{e(row.get("text"))}</pre>'
            layer = row.get("text_layer")
            texts += f'<h4>text layer</h4><pre class="text">{e(layer) if layer else "(none)"}</pre>'
        meta = (
            f"{row.get('width')}x{row.get('height')} px, {row.get('visual_tokens')} visual tokens, "
            f"{row.get('generated_tokens')} generated, finish {row.get('finish_reason')}"
        )
        cards.append(
            f'<section class="sample"><h3 title="{e(row["uri"])}">{e(name)} — {e(where)}</h3>'
            f'<div class="pair"><div class="media">{previews.get(k, "")}</div>'
            f'<div class="texts">{texts}<p class="meta">{e(meta)}</p></div></div></section>'
        )
    return "".join(cards)


# ---------------------------------------------------------------- the page


def _when(iso: str | None) -> str | None:
    """An ISO timestamp to the second, as people read it."""
    return iso[:19].replace("T", " ") + " UTC" if iso else iso


def summary_section(manifest: dict[str, Any], unit: str) -> str:
    counts, tokens, run = manifest.get("counts", {}), manifest.get("tokens", {}), manifest.get("run", {})
    model = manifest.get("model", {})
    cells = [
        ("job", manifest.get("job_id")),
        ("kind", manifest.get("kind")),
        ("status", manifest.get("status")),
        ("model", model.get("id")),
        ("model fingerprint", model.get("fingerprint")),
        ("items", counts.get("items")),
        (unit, counts.get(unit)),
        ("ok", counts.get("ok")),
        ("errors", counts.get("errors")),
        ("prompt tokens", tokens.get("prompt_tokens")),
        ("visual tokens", tokens.get("visual_tokens")),
        ("generated tokens", tokens.get("generated_tokens")),
        ("generated tokens/s (last run)", run.get("generated_tokens_per_s")),
        ("wall time (last run), s", run.get("wall_s")),
        ("started (last run)", _when(manifest.get("started_at"))),
        ("finished", _when(manifest.get("finished_at"))),
    ]
    pairs = [f'<th>{e(k)}</th><td data-key="{e(k)}">{e(v)}</td>' for k, v in cells]
    body = "".join(f"<tr>{''.join(pairs[i : i + 3])}</tr>" for i in range(0, len(pairs), 3))
    runs = manifest.get("runs", [])
    run_rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{e(v)}</td>"
            for v in (
                r.get("job_id"),
                _when(r.get("started_at")),
                r.get("items_processed"),
                r.get(unit),
                r.get("errors"),
                r.get("wall_s"),
                r.get("generated_tokens_per_s"),
            )
        )
        + "</tr>"
        for r in runs
    )
    runs_table = (
        f"<h3>runs</h3><table class='runs'><tr><th>run</th><th>started</th><th>items run</th>"
        f"<th>{e(unit)}</th><th>errors</th><th>wall s</th><th>gen tok/s</th></tr>{run_rows}</table>"
        if runs
        else ""
    )
    return f'<table class="summary">{body}</table>{runs_table}'


def errors_section(errors: list[dict[str, Any]]) -> str:
    if not errors:
        return "<p class='none'>no errors</p>"
    rows = []
    for stage, message, members in error_groups(errors):
        files = "".join(
            f'<li class="error-file">{e(r.get("uri"))}{e(unit_label(r))}</li>'
            for r in members[:FILES_PER_ERROR]
        )
        if len(members) > FILES_PER_ERROR:
            files += f"<li>and {len(members) - FILES_PER_ERROR} more</li>"
        rows.append(
            f'<tr class="error-group"><td>{e(stage)}</td><td>{len(members)}</td>'
            f"<td><pre>{e(message)}</pre><ul>{files}</ul></td></tr>"
        )
    head = "<tr><th>stage</th><th>rows</th><th>message (FILE: each file below), files</th></tr>"
    return f"<table class='errors'>{head}{''.join(rows)}</table>"


def unit_label(row: dict[str, Any]) -> str:
    if row.get("window_index") is not None:
        return f" (window {row['window_index'] + 1})"
    if row.get("page_index") is not None:
        return f" (page {row['page_index'] + 1})"
    return ""


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{margin-top:28px;border-bottom:1px solid #ccc}h3{font-size:15px;margin:8px 0}
h4{margin:6px 0 2px;font-size:13px;color:#555}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
table.summary th{background:#f4f4f4;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:16px}.plot{margin:0}.plot figcaption{font-weight:600}
svg text{font-size:10px;fill:#333}
.sample{border:1px solid #ddd;border-radius:6px;padding:8px 12px;margin:12px 0}
.pair{display:flex;gap:16px;align-items:flex-start}
.media{flex:0 0 auto;max-width:70%}.texts{flex:1;min-width:0}
.frames{display:flex;flex-wrap:wrap;gap:4px}
.frame{display:flex;flex-direction:column;align-items:center;font-size:11px}
pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;padding:6px;margin:0;
max-height:320px;overflow:auto}
.missing{color:#a33;font-weight:600}.meta{color:#666;font-size:12px}.none{color:#666}
img.page{border:1px solid #ccc}
"""


def render_report(out_dir: str | Path, samples: int = 12) -> str:
    """The HTML report of the output in `out_dir` (a string holding the whole self-contained page)."""
    manifest, dataset = load_output(out_dir)
    out_dir = Path(out_dir)
    unit = "windows" if manifest.get("kind") == "caption_videos" else "pages"
    columns = [*SUMMARY_COLUMNS, "window_index" if unit == "windows" else "page_index"]
    if dataset is None:
        return page(out_dir, manifest, unit, [], "", "", [])
    table = dataset.to_table(columns=columns)
    ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False)
    errors = table.filter(pc.invert(ok)).to_pylist()
    ok_rows = table.filter(ok)
    chosen = pick_samples(ok.to_numpy(zero_copy_only=False), samples)
    sample_rows = dataset.take(chosen).to_pylist() if chosen else []
    finish = pc.if_else(ok, pc.fill_null(table.column("finish_reason"), "none"), "error")
    reasons = sorted((r["values"], r["counts"]) for r in pc.value_counts(finish).to_pylist())
    plots = "".join(
        [
            histogram(f"visual tokens per {unit[:-1]}", column_values(ok_rows, "visual_tokens")),
            histogram(f"generated tokens per {unit[:-1]}", column_values(ok_rows, "generated_tokens")),
            svg_bars("finish reasons", [r for r, _ in reasons], [n for _, n in reasons]),
        ]
    )
    throughput = throughput_plot(*finish_times(table, manifest.get("started_at")), unit)
    return page(out_dir, manifest, unit, errors, plots, throughput, sample_rows)


def column_values(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).drop_null().to_numpy()


def page(
    out_dir: Path,
    manifest: dict[str, Any],
    unit: str,
    errors: list[dict[str, Any]],
    plots: str,
    throughput: str,
    sample_rows: list[dict[str, Any]],
) -> str:
    """The whole HTML document."""
    title = f"vlbatch report: {manifest.get('kind')} {manifest.get('job_id')}"
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{e(title)}</h1>"
        f'<p class="meta">output {e(out_dir.resolve())} — generated {e(now)}</p>'
        f"<h2>summary</h2>{summary_section(manifest, unit)}"
        f"<h2>errors</h2>{errors_section(errors)}"
        f'<h2>tokens and finish reasons</h2><div class="plots">{plots}</div>'
        f'<h2>throughput</h2><div class="plots">{throughput}</div>'
        f"<h2>sample of {len(sample_rows)} {e(unit)}</h2>{sample_section(manifest, sample_rows)}"
        "</body></html>\n"
    )


def write_report(out_dir: str | Path, html_path: str | Path | None = None, samples: int = 12) -> Path:
    """Write the report of `out_dir` (default `OUT/_report.html`); returns its path."""
    path = Path(html_path) if html_path is not None else Path(out_dir) / REPORT_NAME
    text = render_report(out_dir, samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
