"""Video decode is frame-exact on every codec: each returned frame shows the index it was asked for."""

from __future__ import annotations

import dataclasses
import functools
import re

import av
import numpy as np
import pytest
from media import make_audio_only, make_random_bytes, make_video, read_index, strip_mp4_timing, truncate

import pipeline.decode.video as video
from model.pixels import num_sampled_frames, resize_video_frames, sample_frame_indices
from pipeline.budget import TokenBudget
from pipeline.decode.files import DecodeError
from pipeline.decode.video import DecodeVideo, decode_video, probe_video
from pipeline.decode.windows import VideoDecodeConfig, VideoInfo, frame_size, plan_windows, video_tokens
from schemas import CaptionVideosJob

N_FRAMES, FPS = 120, 24
# (encoder, file suffix, B-frames, decoder the auto choice must pick)
CODECS = [
    ("h264", "mp4", 2, "decord"),
    ("h264", "mkv", 2, "decord"),
    ("h264", "avi", 2, "pyav"),  # AVI keeps no presentation timestamps: decord misplaces B-frames there
    ("hevc", "mp4", 2, "decord"),
    ("hevc", "mkv", 2, "decord"),
    ("libvpx-vp9", "webm", 0, "decord"),
    ("libsvtav1", "mp4", 0, "pyav"),  # decord cannot open AV1
    ("libsvtav1", "mkv", 0, "pyav"),
    ("mpeg4", "avi", 2, "pyav"),  # MPEG-4 Part 2 with B-frames: decord's random access returns other frames
    ("mpeg4", "mp4", 2, "pyav"),
    ("mpeg4", "mkv", 2, "pyav"),
    ("msmpeg4", "avi", 0, "pyav"),  # DivX 3 era
    ("msmpeg4v2", "avi", 0, "pyav"),
]
CFG = VideoDecodeConfig(fps=6.0, clip_seconds=2.0)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[tuple[str, str], str]:
    root = tmp_path_factory.mktemp("videos")
    out = {}
    for codec, suffix, b_frames, _ in CODECS:
        path = root / f"{codec}_b{b_frames}.{suffix}"
        out[codec, suffix] = str(make_video(path, codec, n_frames=N_FRAMES, fps=FPS, b_frames=b_frames))
    return out


def leading_clean_frames(path: str) -> int:
    """Frames a plain sequential PyAV decode yields, in order, before the first damaged one."""
    n = 0
    with av.open(path) as container:
        try:
            for frame in container.decode(video=0):
                if frame.is_corrupt or read_index(frame.to_ndarray(format="rgb24")) != n:
                    break
                n += 1
        except av.FFmpegError:
            pass
    return n


def assert_exact(rows: list[dict]) -> None:
    for row in rows:
        assert row["pixels"].dtype == np.uint8 and row["pixels"].shape[0] == len(row["frame_indices"])
        decoded = [read_index(frame) for frame in row["pixels"]]
        assert decoded == row["frame_indices"], f"{row['uri']} window {row['window_index']}"


@pytest.mark.parametrize("codec,suffix,b_frames,backend", CODECS, ids=[f"{c[0]}-{c[1]}" for c in CODECS])
def test_decode_is_frame_exact(videos, codec, suffix, b_frames, backend):
    path = videos[codec, suffix]
    rows = list(decode_video(path, CFG))
    assert_exact(rows)
    assert {row["decoder"] for row in rows} == {backend}
    # The windows tile the video and each samples what the reference rules sample from its frames.
    expected = plan_windows(probe_video(path), CFG)
    assert [r["window_index"] for r in rows] == list(range(len(expected))) and len(rows) > 1
    assert rows[0]["start_frame"] == 0 and rows[-1]["end_frame"] == N_FRAMES
    for row, window in zip(rows, expected, strict=True):
        span = window.end_frame - window.start_frame
        picks = sample_frame_indices(
            span, FPS, CFG.fps, CFG.min_frames, CFG.max_frames, first_frame=window.start_frame
        )
        assert row["frame_indices"] == picks
        assert row["frame_timestamps"] == pytest.approx([i / FPS for i in row["frame_indices"]], abs=1e-3)
        assert row["start_s"] == pytest.approx(window.start_frame / FPS, abs=1e-3)
        assert row["end_s"] == pytest.approx(window.end_frame / FPS, abs=1e-3)
        assert row["pixels"].shape[1:] == (row["height"], row["width"], 3)
        assert row["height"] % 28 == 0 and row["width"] % 28 == 0
        assert row["num_windows"] == len(expected)


@pytest.mark.parametrize("codec,suffix", [("h264", "mp4"), ("mpeg4", "avi")])
def test_frames_are_the_library_frames_resized_once(videos, monkeypatch, codec, suffix):
    """Each row holds the decoder's own RGB frames passed through `resize_video_frames` (the processor's
    video resize), whether decord reads a window in one batch or in several, and PyAV frame by frame."""
    import decord

    path = videos[codec, suffix]
    one_batch = list(decode_video(path, CFG))
    monkeypatch.setattr(video, "DECODE_BATCH_BYTES", 96 * 64 * 3 * 3)  # 3 source frames per decord batch
    rows = list(decode_video(path, CFG))
    if one_batch[0]["decoder"] == "decord":
        reader = decord.VideoReader(path, ctx=decord.cpu(0))
        source = {i: reader[i].asnumpy() for row in rows for i in row["frame_indices"]}
    else:
        with av.open(path) as container:
            source = dict(enumerate(f.to_ndarray(format="rgb24") for f in container.decode(video=0)))
    for row, whole in zip(rows, one_batch, strict=True):
        size = (row["height"], row["width"])
        assert row["pixels"].shape[0] > 3 and size != (64, 96)  # several batches, and a real resize
        expected = resize_video_frames(np.stack([source[i] for i in row["frame_indices"]]), *size)
        assert np.array_equal(row["pixels"], expected) and np.array_equal(whole["pixels"], expected)


@pytest.mark.parametrize("codec,suffix", [("h264", "mp4"), ("mpeg4", "avi")])
def test_windows_through_the_decode_child_are_the_same_frames(videos, codec, suffix):
    """In a job the frames are resized straight into the shared memory they travel in (decord and PyAV
    paths alike): what arrives is what an in-process decode gives, frame for frame."""
    from pipeline.decode.shared_memory import SHARED_MIN_BYTES
    from pipeline.decode.supervisor import IsolatedDecoder

    path = videos[codec, suffix]
    here = list(decode_video(path, CFG))
    assert here[0]["pixels"].nbytes >= SHARED_MIN_BYTES  # big enough to take the shared-memory path
    decoder = IsolatedDecoder(functools.partial(DecodeVideo, CFG), timeout_s=60)
    try:
        for _ in range(2):  # the second item reuses the slots the first one filled
            there = list(decoder({"uri": path, "item_id": "v"}))
            assert_exact(there)
            assert [r["window_index"] for r in there] == [r["window_index"] for r in here]
            for got, want in zip(there, here, strict=True):
                assert np.array_equal(got["pixels"], want["pixels"])
    finally:
        decoder.close()


def test_a_job_decodes_with_as_many_threads_as_its_decode_workers_have_cpus():
    from schemas import validate_job

    def threads(cpus: float) -> int:
        job = validate_job(
            {
                "kind": "caption_videos",
                "inputs": ["/data/v.mp4"],
                "output": "/data/out",
                "model": "/models/m",
                "resources": {"cpus_per_decode_worker": cpus},
            }
        )
        return VideoDecodeConfig.from_job(job).threads

    assert (threads(1.0), threads(0.5), threads(2.5)) == (1, 1, 3)  # never 0, FFmpeg's one per core


def test_index_pattern_catches_decord_misreads(videos):
    """The premise, shown: forced onto decord, MPEG-4 with B-frames comes back with wrong frames."""
    rows = list(decode_video(videos["mpeg4", "avi"], VideoDecodeConfig(fps=6.0, backend="decord")))
    decoded = [read_index(f) for row in rows for f in row["pixels"]]
    asked = [i for row in rows for i in row["frame_indices"]]
    assert decoded != asked


def test_probe_reads_metadata(videos):
    info = probe_video(videos["h264", "mp4"])
    assert (info.width, info.height, info.codec) == (96, 64, "h264")
    assert info.fps == pytest.approx(FPS) and info.frame_count == N_FRAMES and info.counted
    assert info.duration_s == pytest.approx(N_FRAMES / FPS)
    header_only = probe_video(videos["mpeg4", "mkv"], count_frames=False)
    assert header_only.frame_count == N_FRAMES and not header_only.counted


@pytest.mark.parametrize(
    "codec,suffix,b_frames,options",
    [
        ("h264", "mp4", 2, {"movflags": "faststart"}),  # index first: the header lists frames that are gone
        ("mpeg4", "avi", 2, None),
        ("mpeg4", "mp4", 2, {"movflags": "faststart"}),
        ("hevc", "mkv", 0, None),
        ("libvpx-vp9", "webm", 0, None),
    ],
)
def test_truncated_file_samples_only_what_decodes(tmp_path, codec, suffix, b_frames, options):
    full = make_video(
        tmp_path / f"full.{suffix}",
        codec,
        n_frames=240,
        fps=FPS,
        b_frames=b_frames,
        container_options=options,
    )
    for keep in (0.3, 0.6):
        path = str(truncate(full, keep, tmp_path / f"cut{keep}.{suffix}"))
        claimed = probe_video(path, count_frames=False).frame_count
        counted = probe_video(path).frame_count
        clean = leading_clean_frames(path)
        assert claimed == 240 and 0 < clean <= counted < claimed  # the header over-reports, counting not
        rows = list(decode_video(path, VideoDecodeConfig(fps=4.0)))
        assert_exact(rows)
        # Sampling spans what really decodes, up to its last frame, and never indexes past it.
        assert rows[-1]["frame_indices"][-1] == clean - 1


def test_long_video_windows_and_memory_shape(tmp_path):
    path = str(make_video(tmp_path / "long.mp4", "h264", n_frames=100, fps=10))
    rows = list(DecodeVideo(VideoDecodeConfig(fps=2.0, clip_seconds=3.0))({"uri": path, "item_id": "abc"}))
    assert [(r["start_frame"], r["end_frame"]) for r in rows] == [(0, 30), (30, 60), (60, 90), (90, 100)]
    assert all(r["item_id"] == "abc" and r["status"] == "ok" for r in rows)
    for r in rows:
        span = r["end_frame"] - r["start_frame"]
        assert r["frame_count"] == num_sampled_frames(span, 10.0, 2.0, 4, 768)
    assert_exact(rows)


def info_of(frames: int, fps: float = 10.0, width: int = 320, height: int = 240) -> VideoInfo:
    return VideoInfo("x.mp4", "mp4", "h264", width, height, fps, frames, frames / fps, True)


def test_short_tail_joins_the_previous_window():
    windows = plan_windows(info_of(92), VideoDecodeConfig(clip_seconds=3.0, min_frames=4))
    assert [(w.start_frame, w.end_frame) for w in windows] == [(0, 30), (30, 60), (60, 92)]
    whole = plan_windows(info_of(92), VideoDecodeConfig())
    assert len(whole) == 1 and whole[0].frame_indices[-1] == 91


def test_frame_size_shares_the_total_budget():
    cfg = VideoDecodeConfig(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64, total_pixels=28 * 28 * 128)
    sizes = {n: frame_size(720, 1280, n, cfg) for n in (4, 8, 32)}
    for n, (h, w) in sizes.items():
        assert h % 28 == 0 and w % 28 == 0
        per_frame = max(min(cfg.max_pixels, cfg.total_pixels / n * 2), cfg.min_pixels * 1.05)
        assert h * w <= per_frame
    areas = [h * w for h, w in sizes.values()]
    assert areas[0] > areas[1] > areas[2]  # more frames in a window, fewer pixels each


def test_extreme_aspect_ratios_decode(tmp_path):
    for size in ((1920, 40), (40, 1920)):
        path = str(make_video(tmp_path / f"{size[0]}x{size[1]}.mp4", "h264", n_frames=8, fps=4, size=size))
        rows = list(decode_video(path, VideoDecodeConfig()))
        assert len(rows) == 1 and rows[0]["frame_indices"] == sample_frame_indices(8, 4.0)
        h, w = rows[0]["height"], rows[0]["width"]
        assert (w > h) == (size[0] > size[1]) and h % 28 == 0 and w % 28 == 0
        assert_exact(rows)


def test_audio_stream_is_ignored_and_file_uri_accepted(tmp_path):
    path = make_video(tmp_path / "with audio.mp4", "h264", n_frames=24, fps=12, audio=True)
    rows = list(decode_video(path.as_uri(), VideoDecodeConfig()))
    assert len(rows) == 1
    assert_exact(rows)


def bad_videos(tmp_path) -> dict[str, tuple[str, str]]:
    """name -> (path, fragment the error message must hold)."""
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    zero = strip_mp4_timing(make_video(tmp_path / "zero_fps.mp4", "mpeg4", n_frames=24))
    return {
        "empty": (str(empty), "not a readable video"),
        "random": (str(make_random_bytes(tmp_path / "random.mp4")), "not a readable video"),
        "audio only": (str(make_audio_only(tmp_path / "audio.m4a")), "no video stream"),
        "zero fps": (str(zero), "no frame rate"),
        "truncated to the header": (str(truncate(make_video(tmp_path / "t.mkv", "h264"), 0.02)), "damaged"),
    }


def test_bad_files_become_one_error_row_each(tmp_path):
    decode = DecodeVideo(VideoDecodeConfig())
    for name, (path, fragment) in bad_videos(tmp_path).items():
        with pytest.raises(DecodeError, match=fragment):
            list(decode_video(path, VideoDecodeConfig()))
        rows = list(decode({"uri": path, "item_id": name}))
        assert len(rows) == 1, name
        row = rows[0]
        assert row["status"] == "error" and row["error_stage"] == "decode" and row["item_id"] == name
        assert path in row["error_message"] and fragment in row["error_message"], row["error_message"]
        assert row["window_index"] is None


def test_limits_refuse_before_decoding(tmp_path):
    path = str(make_video(tmp_path / "v.mp4", "h264", n_frames=48, fps=24))
    for cfg, fragment in [
        (VideoDecodeConfig(max_video_seconds=1.0), "max_video_seconds"),
        (VideoDecodeConfig(max_source_frames=10), "max_frames"),
        (VideoDecodeConfig(max_source_pixels=1000), "max_pixels"),
    ]:
        (row,) = DecodeVideo(cfg)({"uri": path, "item_id": "i"})
        assert row["status"] == "error" and fragment in row["error_message"] and path in row["error_message"]


# -- fitting windows to the model's context -----------------------------------------------------------------

BUDGET = 32_229  # Qwen2-VL's 32,768 less the default prompt's text and 512 new tokens


def window_tokens(window) -> int:
    return video_tokens(len(window.frame_indices), window.height, window.width)


def test_a_window_that_fits_is_sampled_as_the_reference_does():
    cfg = VideoDecodeConfig(clip_seconds=120.0)
    plain = plan_windows(info_of(300, fps=10), cfg)  # 30 s: 60 frames of 768 tokens fit
    fitted = plan_windows(info_of(300, fps=10), dataclasses.replace(cfg, max_visual_tokens=BUDGET))
    assert fitted == plain


def test_fit_lowers_pixels_before_frames():
    info = info_of(1200, fps=10, width=768, height=576)  # 120 s window: 240 frames of 768 tokens overflow
    cfg = VideoDecodeConfig(clip_seconds=120.0, max_visual_tokens=BUDGET)
    (window,) = plan_windows(info, cfg)
    assert len(window.frame_indices) == 240  # every frame the reference picks is kept ...
    assert window_tokens(window) <= BUDGET  # ... at a smaller size
    assert window.height * window.width >= cfg.min_pixels
    unfitted = plan_windows(info, dataclasses.replace(cfg, max_visual_tokens=None))[0]
    assert unfitted.frame_indices == window.frame_indices and window_tokens(unfitted) > BUDGET


def test_fit_takes_fewer_frames_once_pixels_are_at_their_floor():
    info = info_of(36_000, fps=10, width=1920, height=1080)  # one hour in one window: 768 frames
    cfg = VideoDecodeConfig(clip_seconds=None, max_visual_tokens=BUDGET)
    (window,) = plan_windows(info, cfg)
    n = len(window.frame_indices)
    assert n % 2 == 0 and n < 768 and window_tokens(window) <= BUDGET
    assert window_tokens(window) > BUDGET - 2 * video_tokens(2, window.height, window.width)  # not too few
    gaps = np.diff(window.frame_indices)
    assert window.frame_indices[0] == 0 and window.frame_indices[-1] == 35_999  # ends included
    assert gaps.max() - gaps.min() <= 1  # evenly spread


def test_explicit_floors_that_cannot_fit_name_the_setting_and_a_value_that_fits():
    info = info_of(12_000, fps=10, width=1920, height=1080)
    job = CaptionVideosJob(inputs=["x.mp4"], output="o", model="m", min_frames=600, clip_seconds=None)
    cfg = VideoDecodeConfig.from_job(job, TokenBudget(32_768, 27, 512))
    assert cfg.floors == ("min_frames",)
    with pytest.raises(DecodeError, match=r"set min_frames to at most (\d+)") as e:
        plan_windows(info, cfg)
    fits = int(re.search(r"at most (\d+)", str(e.value)).group(1))
    assert "x.mp4" in str(e.value) and "32,768" in str(e.value)
    (window,) = plan_windows(info, dataclasses.replace(cfg, min_frames=fits))  # the value given does fit
    assert len(window.frame_indices) == fits and window_tokens(window) <= BUDGET

    job = CaptionVideosJob(
        inputs=["x.mp4"], output="o", model="m", min_pixels=28 * 28 * 700, min_frames=100, clip_seconds=None
    )
    cfg = VideoDecodeConfig.from_job(job, TokenBudget(32_768, 27, 512))
    with pytest.raises(DecodeError, match=r"min_pixels to at most (\d+)") as e:
        plan_windows(info, cfg)
    fits = int(re.search(r"min_pixels to at most (\d+)", str(e.value)).group(1))
    (window,) = plan_windows(info, dataclasses.replace(cfg, min_pixels=fits))
    assert len(window.frame_indices) >= 100 and window_tokens(window) <= BUDGET
    # Defaults are lowered freely: the same video with the default floors fits.
    default = VideoDecodeConfig.from_job(
        CaptionVideosJob(inputs=["x.mp4"], output="o", model="m"), TokenBudget(32_768, 27, 512)
    )
    assert default.floors == () and all(window_tokens(w) <= BUDGET for w in plan_windows(info, default))


def test_a_budget_too_small_for_two_frames_names_max_new_tokens():
    cfg = VideoDecodeConfig(max_visual_tokens=100, budget_note="the model's context leaves 100")
    with pytest.raises(DecodeError, match="sampling.max_new_tokens lower by at least"):
        plan_windows(info_of(100), cfg)


def test_one_frame_is_a_still_shown_twice():
    (window,) = plan_windows(info_of(1), VideoDecodeConfig(max_visual_tokens=BUDGET))
    assert window.frame_indices == (0, 0) and (window.start_frame, window.end_frame) == (0, 1)
