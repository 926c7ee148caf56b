"""With the job's defaults, videos of every length and size and pages of any dpi fit the model's context,
windows cover whole videos, and `vlbatch plan` predicts exactly what the run then does."""

from __future__ import annotations

import pandas as pd
import pytest
from media import make_flat_video, make_pdf, make_random_bytes

from jobs.plan import plan_job
from model.processor import Processor
from pipeline.budget import model_context
from pipeline.decode.stage import make_decoder
from pipeline.driver import run_job
from pipeline.prepare import messages_for, visual_item
from schemas import validate_job

# name -> (seconds, fps, (width, height)); flat colours, so minutes of 1080p encode in seconds.
FIT_VIDEOS = {
    "still_576p.mp4": (0.1, 10, (768, 576)),  # one frame
    "3s_576p.mp4": (3, 10, (768, 576)),
    "90s_576p.mp4": (90, 10, (768, 576)),
    "10min_576p.mp4": (600, 10, (768, 576)),
    "90s_1080p.mp4": (90, 10, (1920, 1080)),
    "10min_1080p.mp4": (600, 5, (1920, 1080)),
    "20s_4k.mp4": (20, 24, (3840, 2160)),
}
RUN_VIDEOS = ("still_576p.mp4", "3s_576p.mp4", "90s_576p.mp4", "20s_4k.mp4")  # run end to end
CPU = {  # how the job runs here, not how it sizes windows
    "dtype": "float32",
    "device": "cpu",
    "resources": {"decode_workers": 1, "cpus_per_decode_worker": 0.5, "gpu_workers": 1, "gpus_per_worker": 0},
}
# The runs generate a few tokens, not the default 512 the random model would spend on noise; the windows and
# pages are still sized to fit the context with what the job generates, which is what is checked.
RUN_SAMPLING = {"sampling": {"max_new_tokens": 8}}


def make_videos(root, names) -> None:
    root.mkdir()
    for name in names:
        seconds, fps, size = FIT_VIDEOS[name]
        make_flat_video(root / name, seconds, fps, size)


@pytest.fixture(scope="module")
def fit_media(tmp_path_factory):
    """What the end-to-end run reads: the short videos, a broken one, a large page and a broken PDF."""
    root = tmp_path_factory.mktemp("fit-media")
    make_videos(root / "run", RUN_VIDEOS)
    make_random_bytes(root / "run" / "broken.mp4")
    (root / "docs").mkdir()
    # An A0 page and a letter page: at 600 dpi both would be far over any context.
    make_pdf(root / "docs" / "large.pdf", pages=2, sizes={0: (2384.0, 3370.0), 1: (612.0, 792.0)})
    make_random_bytes(root / "docs" / "broken.pdf")
    return root


# Minutes of 1080p and 4K decoded with FFmpeg's threads: beside another test's Ray actors and ranks those
# threads got a small share of the cores, and the test took five times as long as alone.
@pytest.mark.alone
def test_default_windows_fit_the_context_and_cover_every_video(tmp_path, tiny_checkpoint):
    videos = tmp_path / "videos"
    make_videos(videos, FIT_VIDEOS)
    job = validate_job({"kind": "caption_videos", "inputs": [str(videos)], "output": "unused",
                        "model": str(tiny_checkpoint)})
    context = model_context(job.model)
    processor = Processor.from_pretrained(job.model)
    decode = make_decoder(job, isolated=False)()
    for name, (seconds, fps, _) in FIT_VIDEOS.items():
        rows = list(decode({"uri": str(videos / name), "item_id": name}))
        assert all(r["status"] == "ok" for r in rows), (name, [r.get("error_message") for r in rows])
        frames = max(1, round(seconds * fps))
        assert [r["window_index"] for r in rows] == list(range(rows[0]["num_windows"]))
        # Windows tile the video: frame ranges and seconds, no gap, no overlap, to the end.
        assert rows[0]["start_frame"] == 0 and rows[-1]["end_frame"] == frames
        assert rows[0]["start_s"] == 0.0 and rows[-1]["end_s"] == pytest.approx(frames / fps)
        for a, b in zip(rows, rows[1:]):
            assert a["end_frame"] == b["start_frame"] and a["end_s"] == b["start_s"]
        for r in rows:
            assert r["end_s"] - r["start_s"] <= job.clip_seconds + 1e-9  # 2-minute windows by default
            prompt = processor.count_tokens(messages_for(visual_item(r["pixels"].shape), job.prompt))
            assert prompt.num_tokens + job.sampling.max_new_tokens <= context, (name, prompt.num_tokens)
            assert r["frame_count"] == len(r["frame_timestamps"]) and r["sample_fps"] > 0
        if frames == 1:
            assert rows[0]["frame_count"] == 1 and rows[0]["pixels"].shape[0] == 2
        assert len(rows) == -(-seconds // job.clip_seconds)


def per_item(df: pd.DataFrame, unit_frames: bool) -> dict[str, tuple]:
    """uri -> (units, frames, visual tokens, error messages), as the output holds them."""
    out = {}
    for uri, g in df.groupby("uri"):
        errors = sorted(g.error_message.dropna())
        frames = int(g.frame_count.fillna(0).sum()) if unit_frames else int((g.status == "ok").sum())
        out[uri] = (len(g), frames, int(g.visual_tokens.fillna(0).sum()), errors)
    return out


def per_plan(plan) -> dict[str, tuple]:
    return {
        p.uri: (p.units, p.frames if not p.problem else 0, p.visual_tokens, [p.problem] if p.problem else [])
        for p in plan.items
    }


@pytest.mark.slow
def test_plan_and_run_agree_item_by_item(fit_media, tiny_checkpoint, ray_local, tmp_path):
    run = {**CPU, **RUN_SAMPLING, "model": str(tiny_checkpoint)}
    caption = validate_job({**run, "kind": "caption_videos", "inputs": [str(fit_media / "run")],
                            "output": str(tmp_path / "captions")})
    # dpi 600 on an A0 page, under a context the job narrows: the render scale is lowered to fit.
    ocr = validate_job({**run, "kind": "ocr_documents", "inputs": [str(fit_media / "docs")], "dpi": 600,
                        "max_model_len": 8192, "output": str(tmp_path / "pages")})
    for job, videos in ((caption, True), (ocr, False)):
        plan = plan_job(job)  # before the run: nothing is done yet
        summary = run_job(job, progress=False)
        df = pd.read_parquet(job.output)
        assert per_item(df, videos) == per_plan(plan)
        bad = df[df.uri.str.contains("broken")]
        assert len(bad) == 1 and (bad.status == "error").all() and (bad.error_stage == "decode").all()
        good = df[~df.uri.str.contains("broken")]
        assert (good.status == "ok").all(), good[good.status != "ok"].error_message.tolist()
        context = model_context(job.model, job.max_model_len)
        assert (good.prompt_tokens + good.visual_tokens + job.sampling.max_new_tokens <= context).all()
        assert (good.finish_reason != "error").all() and summary.run.errors == 1
        assert plan.largest_unit() <= context == plan.context
    pages = pd.read_parquet(ocr.output).dropna(subset=["page_index"])
    a0 = pages[pages.page_index == 0].iloc[0]
    assert a0.width < 2384 * 600 / 72 / 4  # rendered far below 600 dpi ...
    room = 8192 - a0.prompt_tokens - ocr.sampling.max_new_tokens
    assert room >= a0.visual_tokens > 0.8 * room  # ... and as large as fits
