"""Frame-exact video decode: metadata, windows, frame sampling, resize; one row per window.

Frame i is the i-th frame in presentation order. decord is fast and exact on h264, hevc, vp8 and vp9 in
mp4/mov/mkv/webm, so it serves those. Elsewhere its random access returns other frames than asked (MPEG-4
Part 2 with B-frames; anything in AVI, whose index has no presentation timestamps) or it cannot open the
file (AV1), so every other file is decoded sequentially with PyAV: decode in order, keep the wanted frames,
stop after the last one.

The frame count comes from demuxing the stream (packets are read, nothing is decoded), not from the
header: a truncated file whose header says 444 frames yields only the frames it really holds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import av
import numpy as np

from model.pixels import (
    FRAME_FACTOR,
    IMAGE_FACTOR,
    resize_video_frames,
    sample_frame_indices,
    smart_resize,
    video_frame_size,
)
from pipeline.budget import TokenBudget
from pipeline.isolation import output_array
from pipeline.media import DecodeError, error_row, local_file
from schemas.jobs import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, VIDEO_TOTAL_PIXELS, CaptionVideosJob

# Job settings the context fit treats as floors when the user set them (defaults are lowered freely).
FIT_FLOORS = ("min_frames", "min_pixels")

DECORD_CODECS = frozenset({"h264", "hevc", "vp8", "vp9"})
DECORD_CONTAINERS = ("mp4", "mov", "matroska", "webm")  # substrings of PyAV's format names
DECODE_BATCH_BYTES = 1 << 27  # source-resolution frames per decord batch: bounds memory, not frame count
MAX_PACKET_ERRORS = 64  # a stream with more undecodable packets than this is called damaged


@dataclass
class VideoDecodeConfig:
    """How frames are sampled and sized (the qwen-vl-utils rules) and what a video may cost at most."""

    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768  # per window
    min_pixels: int = VIDEO_MIN_PIXELS  # per frame
    max_pixels: int = VIDEO_MAX_PIXELS  # per frame
    total_pixels: int = VIDEO_TOTAL_PIXELS  # all sampled frames of one window
    clip_seconds: float | None = None
    max_video_seconds: float = 4 * 3600.0
    max_source_frames: int = 1_000_000
    max_source_pixels: int = 89_478_485
    threads: int = 0  # decoder threads; 0 lets the decoder choose
    backend: Literal["auto", "decord", "pyav"] = "auto"  # auto: decord only where it is frame-exact
    # The model's context: visual tokens one window may take (None: no fit), and the sentence that says why.
    max_visual_tokens: int | None = None
    budget_note: str = ""
    floors: tuple[str, ...] = ()  # of FIT_FLOORS: the ones the user set, which the fit must keep
    model_pixels: tuple[int, int] | None = None  # (min, max) pixels of the model's own resize

    @classmethod
    def from_job(
        cls,
        job: CaptionVideosJob,
        budget: TokenBudget | None = None,
        model_pixels: tuple[int, int] | None = None,
        **overrides: Any,
    ) -> VideoDecodeConfig:
        """The decode settings of a caption job; with `budget`, every window is fitted to the context."""
        values = dict(
            fps=job.fps,
            min_frames=job.min_frames,
            max_frames=job.max_frames,
            min_pixels=job.min_pixels,
            max_pixels=job.max_pixels,
            total_pixels=job.total_pixels,
            clip_seconds=job.clip_seconds,
            max_video_seconds=job.limits.max_video_seconds,
            max_source_frames=job.limits.max_frames,
            max_source_pixels=job.limits.max_pixels,
            # As many decoder threads as the actor has CPUs: left to choose, FFmpeg starts one per core of
            # the node in every decode actor, and a node full of actors thrashes.
            threads=max(1, math.ceil(job.resources.cpus_per_decode_worker)),
            floors=tuple(name for name in FIT_FLOORS if name in job.model_fields_set),
            model_pixels=model_pixels,
        )
        if budget is not None:
            values.update(max_visual_tokens=budget.visual_tokens, budget_note=budget.describe())
        return cls(**{**values, **overrides})


@dataclass
class VideoInfo:
    """What the container says about a video's first video stream, with the frame count made honest."""

    uri: str
    container: str
    codec: str
    width: int
    height: int
    fps: float
    frame_count: int  # demuxed packets when `counted`, else the header's claim or duration x fps
    duration_s: float
    counted: bool
    header_frame_count: int | None = None  # what the container claims, for comparison
    timestamps: list[float] | None = field(default=None, repr=False)  # per frame, when pts are trustworthy

    def timestamp(self, index: int) -> float:
        """Seconds from the first frame to frame `index` (index == frame_count: the end of the video)."""
        if self.timestamps is None:
            return index / self.fps
        if index >= len(self.timestamps):
            return self.timestamps[-1] + 1 / self.fps
        return self.timestamps[index]


@dataclass(frozen=True)
class Window:
    """Frames [start_frame, end_frame) of a video, of which `frame_indices` are sampled at height x width."""

    index: int
    start_frame: int
    end_frame: int
    frame_indices: tuple[int, ...]
    height: int
    width: int


def _open(path: str, uri: str) -> tuple[av.container.InputContainer, av.VideoStream]:
    try:
        container = av.open(path, metadata_errors="ignore")
    except av.FFmpegError as e:
        raise DecodeError(
            f"{uri}: not a readable video ({e.strerror or e}); the file is damaged or not media"
        ) from e
    if not container.streams.video:
        container.close()
        raise DecodeError(f"{uri}: has no video stream (audio only?); remove it from the inputs")
    return container, container.streams.video[0]


def _rate(stream: av.VideoStream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate is not None and rate > 0 and math.isfinite(float(rate)):
            return float(rate)
    return None


def _count_packets(
    container: av.container.InputContainer, stream: av.VideoStream
) -> tuple[int, list[int] | None]:
    """(frames the stream really holds, their pts in presentation order or None where pts are not usable)."""
    stamps: list[int | None] = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_corrupt or packet.is_discard:
                continue  # flush packets, the cut-off tail of a truncated file, frames an edit list drops
            stamps.append(packet.pts)
    except av.FFmpegError:
        pass  # a damaged or truncated container: count what could be read
    # AVI stores no presentation timestamps (PyAV reports decode order there), so index by output order.
    usable = "avi" not in container.format.name and None not in stamps and len(set(stamps)) == len(stamps)
    return len(stamps), sorted(stamps) if usable else None  # type: ignore[type-var]


def _probe(path: str, uri: str, count_frames: bool) -> tuple[VideoInfo, list[int] | None]:
    container, stream = _open(path, uri)
    with container:
        codec = stream.codec_context.codec.canonical_name
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise DecodeError(f"{uri}: the video stream has no frame size; the file is damaged")
        header_frames = stream.frames or None
        header_s = None
        if stream.duration and stream.time_base:
            header_s = float(stream.duration * stream.time_base)
        elif container.duration:
            header_s = container.duration / av.time_base
        fps = _rate(stream)
        pts = None
        if count_frames:
            frame_count, pts = _count_packets(container, stream)
        else:
            frame_count = header_frames or (round(header_s * fps) if header_s and fps else 0)
        if frame_count == 0:
            raise DecodeError(f"{uri}: holds no decodable video frames; the file is empty or damaged")
        if fps is None and pts is not None and frame_count > 1 and pts[-1] > pts[0]:
            fps = (frame_count - 1) / float((pts[-1] - pts[0]) * stream.time_base)
        if fps is None and header_s:
            fps = frame_count / header_s
        if fps is None:
            raise DecodeError(f"{uri}: reports no frame rate and no duration; remux it with a frame rate")
        timestamps = None
        if pts is not None:
            # int / int is correctly rounded in Python: the same floats as Fraction arithmetic, 10x faster.
            num, den = stream.time_base.numerator, stream.time_base.denominator
            timestamps = [(p - pts[0]) * num / den for p in pts]
        info = VideoInfo(
            uri=uri,
            container=container.format.name,
            codec=codec,
            width=width,
            height=height,
            fps=fps,
            frame_count=frame_count,
            duration_s=frame_count / fps,
            counted=count_frames,
            header_frame_count=header_frames,
            timestamps=timestamps,
        )
        return info, pts


def probe_video(uri: str, count_frames: bool = True) -> VideoInfo:
    """Metadata of a video; nothing is decoded. `count_frames` demuxes the stream to count its real frames."""
    with local_file(uri) as path:
        return _probe(path, uri, count_frames)[0]


def check_limits(info: VideoInfo, cfg: VideoDecodeConfig) -> None:
    """Raise DecodeError when a video is beyond the job's limits."""
    if info.duration_s > cfg.max_video_seconds:
        raise DecodeError(
            f"{info.uri}: lasts {info.duration_s:.0f} s, "
            f"over limits.max_video_seconds={cfg.max_video_seconds:g}"
        )
    if info.frame_count > cfg.max_source_frames:
        raise DecodeError(
            f"{info.uri}: has {info.frame_count} frames, over limits.max_frames={cfg.max_source_frames}"
        )
    if info.width * info.height > cfg.max_source_pixels:
        raise DecodeError(
            f"{info.uri}: frames of {info.width}x{info.height} "
            f"exceed limits.max_pixels={cfg.max_source_pixels}"
        )


def frame_size(height: int, width: int, n_frames: int, cfg: VideoDecodeConfig, total_pixels=None):
    """(height, width) of each sampled frame: qwen-vl-utils' per-frame budget under the window's total,
    then the model's own resize bounds.

    Frames are resized here, on the CPU workers, to this final size (`resize_video_frames`), so the
    model-side processor's resize is a no-op and only uint8 pixels of the final size travel on.
    """
    total = cfg.total_pixels if total_pixels is None else total_pixels
    size = video_frame_size(height, width, n_frames, cfg.min_pixels, cfg.max_pixels, total)
    if cfg.model_pixels is not None:
        size = smart_resize(*size, IMAGE_FACTOR, *cfg.model_pixels)
    return size


def video_tokens(n_frames: int, height: int, width: int) -> int:
    """Visual tokens of `n_frames` frames of height x width (multiples of 28): one per 2x28x28 patch."""
    return -(-n_frames // FRAME_FACTOR) * (height // IMAGE_FACTOR) * (width // IMAGE_FACTOR)


def fit_window(
    info: VideoInfo, cfg: VideoDecodeConfig, start: int, count: int
) -> tuple[list[int], int, int]:
    """(source frame indices, height, width) of frames [start, start + count): the reference sampling, fitted
    to the model's context.

    Where the reference rules would overflow `cfg.max_visual_tokens`, frames are first made smaller (as
    total_pixels does, down to min_pixels), then fewer (an even count, evenly spread). A window of one frame
    shows it twice, as the model takes a still. Raises DecodeError when the user's own floors cannot fit.
    """
    if count == 1:
        picks = [start] * FRAME_FACTOR
    else:
        picks = sample_frame_indices(
            count, info.fps, cfg.fps, cfg.min_frames, cfg.max_frames, first_frame=start
        )
    height, width = frame_size(info.height, info.width, len(picks), cfg)
    budget = cfg.max_visual_tokens
    if budget is None or video_tokens(len(picks), height, width) <= budget:
        return picks, height, width
    total = min(cfg.total_pixels, max(budget, 1) * IMAGE_FACTOR**2)  # total_pixels counts tokens x 28 x 28
    floor = FRAME_FACTOR
    if "min_frames" in cfg.floors:  # a floor, but never above what the window has to give
        floor = max(floor, min(len(picks), -(-cfg.min_frames // FRAME_FACTOR) * FRAME_FACTOR))
    smallest = frame_size(info.height, info.width, 1 << 30, cfg, total)  # every frame at min_pixels
    pair = video_tokens(FRAME_FACTOR, *smallest)
    n = min(len(picks), max(floor, budget // pair * FRAME_FACTOR))
    while n >= floor:
        height, width = frame_size(info.height, info.width, n, cfg, total)
        if video_tokens(n, height, width) <= budget:
            if n < len(picks):
                picks = sample_frame_indices(
                    count, info.fps, cfg.fps, min(cfg.min_frames, n), n, first_frame=start
                )
            return picks, height, width
        n -= FRAME_FACTOR
    raise DecodeError(f"{info.uri}: {_fit_advice(cfg, budget, floor, pair)}")


def _fit_advice(cfg: VideoDecodeConfig, budget: int, floor: int, pair: int) -> str:
    """What to change when even the floors overflow: the settings and values that would fit."""
    need = floor // FRAME_FACTOR * pair
    options = []
    if "min_frames" in cfg.floors and budget >= pair:
        options.append(f"min_frames to at most {budget // pair * FRAME_FACTOR}")
    if "min_pixels" in cfg.floors and budget >= floor // FRAME_FACTOR:
        per_frame = budget // (floor // FRAME_FACTOR) * IMAGE_FACTOR**2
        options.append(f"min_pixels to at most {int(per_frame / 1.05)}")  # frames may take 5% more
    if not options:
        options.append(f"sampling.max_new_tokens lower by at least {need - budget:,}, or raise max_model_len")
    return (
        f"{floor} frames of at least min_pixels={cfg.min_pixels} take {need:,} visual tokens, but "
        f"{cfg.budget_note}; set {' or '.join(options)}"
    )


def plan_windows(
    info: VideoInfo, cfg: VideoDecodeConfig, start_frame: int = 0, first_index: int = 0
) -> list[Window]:
    """Cut frames [start_frame, frame_count) into windows of `clip_seconds` and sample each one.

    A tail shorter than `min_frames` joins the window before it.
    """
    total = info.frame_count
    length = max(FRAME_FACTOR, round(cfg.clip_seconds * info.fps)) if cfg.clip_seconds else total
    bounds = [[s, min(s + length, total)] for s in range(start_frame, total, length)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < cfg.min_frames:
        bounds[-1][1] = bounds.pop()[1]  # the pop runs first: [-1] is then the window before the tail
    windows = []
    for k, (start, end) in enumerate(bounds):
        try:
            picks, height, width = fit_window(info, cfg, start, end - start)
        except ValueError as e:
            raise DecodeError(str(e) if info.uri in str(e) else f"{info.uri}: {e}") from e
        windows.append(Window(first_index + k, start, end, tuple(picks), height, width))
    return windows


def choose_backend(info: VideoInfo, cfg: VideoDecodeConfig) -> str:
    """decord where it is frame-exact (and installed), else PyAV's sequential decode."""
    if cfg.backend != "auto":
        return cfg.backend
    if info.codec in DECORD_CODECS and any(name in info.container for name in DECORD_CONTAINERS):
        return "decord"
    return "pyav"


class _ShortStream(Exception):
    """The decoder ran out of frames before the last wanted one: the file holds fewer than counted."""

    def __init__(self, frames: int):
        self.frames = frames


class _DecordFailed(Exception):
    pass


def _decord_windows(path: str, windows: list[Window], info: VideoInfo, cfg: VideoDecodeConfig):
    try:
        import decord
        from torch.utils.dlpack import from_dlpack

        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=cfg.threads)
        if len(reader) != info.frame_count:  # decord counts differently: its indices are not ours
            raise _DecordFailed(f"decord sees {len(reader)} frames, the stream holds {info.frame_count}")
    except Exception as e:  # decord raises its own DECORDError, RuntimeError, ...
        raise _DecordFailed(str(e)) from e
    batch_frames = max(1, DECODE_BATCH_BYTES // (info.width * info.height * 3))
    for window in windows:
        indices = list(window.frame_indices)
        # Resized straight into the row's array (in the decode child, the shared memory it travels in).
        frames = output_array((len(indices), window.height, window.width, 3), np.uint8)
        for at in range(0, len(indices), batch_frames):
            try:
                # DLPack hands decord's buffer to torch as it is: no copy at source resolution.
                batch = from_dlpack(reader.get_batch(indices[at : at + batch_frames]).to_dlpack())
            except Exception as e:
                raise _DecordFailed(str(e)) from e
            resize_video_frames(batch, window.height, window.width, out=frames[at : at + len(batch)])
        yield window, frames, indices


def _decoded_frames(container: av.container.InputContainer, stream: av.VideoStream, uri: str):
    """Frames of `stream` in presentation order; undecodable packets are skipped, a broken tail ends it."""
    errors = 0
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.FFmpegError:
            break  # truncated container: flush what the decoder holds
        try:
            yield from packet.decode()
        except av.FFmpegError as e:
            errors += 1
            if errors > MAX_PACKET_ERRORS:
                raise DecodeError(f"{uri}: more than {MAX_PACKET_ERRORS} undecodable packets ({e})") from e
    try:
        yield from stream.codec_context.decode(None)
    except av.FFmpegError:
        pass


def _pyav_windows(
    path: str, windows: list[Window], info: VideoInfo, pts: list[int] | None, cfg: VideoDecodeConfig
):
    """Sequential decode keeping the wanted frames. A frame the decoder skips is replaced by the next one,
    and the row reports the index really used."""
    pts_index = {p: i for i, p in enumerate(pts)} if pts is not None else None
    targets = [
        (index, w, slot)
        for w, window in enumerate(windows)
        for slot, index in enumerate(window.frame_indices)
    ]
    container, stream = _open(path, info.uri)
    with container:
        stream.thread_type = "AUTO"
        if cfg.threads:
            stream.codec_context.thread_count = cfg.threads
        t, counter, last, good = 0, 0, -1, -1
        frames: np.ndarray | None = None
        used: list[int] = []
        for frame in _decoded_frames(container, stream, info.uri):
            index = pts_index.get(frame.pts) if pts_index is not None and frame.pts is not None else None
            index = counter if index is None else index
            counter = index + 1
            if index >= info.frame_count:
                break  # frames from the damaged packets past the counted end
            if index <= last:
                continue  # a frame the decoder repeats or emits out of order
            last = index
            if frame.is_corrupt:
                continue  # drawn from damaged data (e.g. a B-frame whose reference was cut off): a hole
            good = index
            if targets[t][0] > index:
                continue  # not wanted: no colour conversion, no resize
            pixels = frame.to_ndarray(format="rgb24")
            while t < len(targets) and targets[t][0] <= index:
                _, w, slot = targets[t]
                window = windows[w]
                if slot == 0:
                    frames = output_array((len(window.frame_indices), window.height, window.width, 3))
                    used = []
                assert frames is not None
                resize_video_frames(pixels[None], window.height, window.width, out=frames[slot : slot + 1])
                used.append(index)
                t += 1
                if slot == len(window.frame_indices) - 1:
                    yield window, frames, used
                    frames = None
            if t == len(targets):
                return
    raise _ShortStream(good + 1)


def decode_video(uri: str, cfg: VideoDecodeConfig) -> Iterator[dict[str, Any]]:
    """One row per window: uint8 frames [T,H,W,3], their frame indices and timestamps, window bounds.

    Raises DecodeError (naming the file) for videos that cannot be decoded or are beyond the limits;
    windows already yielded stay valid.
    """
    with local_file(uri) as path:
        started = time.perf_counter()
        info, pts = _probe(path, uri, count_frames=True)
        check_limits(info, cfg)
        windows = plan_windows(info, cfg)
        backend = choose_backend(info, cfg)
        warning = _header_warning(info)
        done = 0
        while done < len(windows):
            todo = windows[done:]
            source = _decord_windows if backend == "decord" else _pyav_windows
            args = (path, todo, info, cfg) if backend == "decord" else (path, todo, info, pts, cfg)
            try:
                for window, frames, used in source(*args):
                    yield _window_row(
                        uri, info, window, len(windows), frames, used, backend, started, warning
                    )
                    done += 1
                    started = time.perf_counter()
            except _DecordFailed:
                backend = "pyav"  # e.g. a damaged tail decord cannot read: PyAV decodes what is there
            except _ShortStream as short:
                start = windows[done].start_frame
                if short.frames >= info.frame_count or short.frames <= start:
                    if done:
                        return  # the earlier windows stand; no frame is left to form another
                    raise DecodeError(
                        f"{uri}: only {short.frames} frame(s) decode; the file is damaged"
                    ) from None
                warning = (
                    f"the stream holds {info.frame_count} frames but only the first {short.frames} decode "
                    f"(damaged or truncated): captions cover {info.timestamp(short.frames):.1f} s of "
                    f"{info.duration_s:.1f} s"
                )
                info.frame_count = short.frames
                info.duration_s = short.frames / info.fps
                if info.timestamps is not None:
                    info.timestamps = info.timestamps[: short.frames]
                    pts = pts[: short.frames] if pts is not None else None
                windows = windows[:done] + plan_windows(info, cfg, start_frame=start, first_index=done)
                backend = "pyav"


def _header_warning(info: VideoInfo) -> str | None:
    """A note for the rows of a video whose container claims more frames than its stream holds."""
    claimed = info.header_frame_count
    if claimed is None or claimed <= info.frame_count + 1:  # some muxers count one flush frame
        return None
    return (
        f"the container claims {claimed} frames but the stream holds {info.frame_count} (truncated or "
        f"damaged): captions cover {info.duration_s:.1f} s, not {claimed / info.fps:.1f} s"
    )


def _window_row(
    uri: str,
    info: VideoInfo,
    window: Window,
    num_windows: int,
    frames: np.ndarray,
    used: list[int],
    backend: str,
    started: float,
    warning: str | None = None,
) -> dict[str, Any]:
    start_s, end_s = info.timestamp(window.start_frame), info.timestamp(window.end_frame)
    if window.end_frame - window.start_frame == 1:
        used = used[:1]  # a still: the model saw the one frame twice
    return {
        "uri": uri,
        "window_index": window.index,
        "num_windows": num_windows,
        "start_frame": window.start_frame,
        "end_frame": window.end_frame,
        "start_s": start_s,
        "end_s": end_s,
        "frames": frames,
        "frame_count": len(used),
        "frame_indices": used,
        "timestamps": [info.timestamp(i) for i in used],
        "height": window.height,
        "width": window.width,
        "sample_fps": len(used) / max(end_s - start_s, 1e-6),
        "source_fps": info.fps,
        "source_width": info.width,
        "source_height": info.height,
        "source_frame_count": info.frame_count,
        "codec": info.codec,
        "decoder": backend,
        "decode_s": time.perf_counter() - started,
        "warning": warning,
    }


class DecodeVideo:
    """Ray Data flat_map stage: an item row in, one row per window out; a failure becomes an error row."""

    def __init__(self, cfg: VideoDecodeConfig):
        self.cfg = cfg

    def __call__(self, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        produced = 0
        try:
            for out in decode_video(row["uri"], self.cfg):
                produced += 1
                yield {**row, "status": "ok", **out}
        except Exception as e:  # every input is accounted for: a bad file is a row, not a dead job
            yield error_row(row, "decode", e, window_index=produced if produced else None)
