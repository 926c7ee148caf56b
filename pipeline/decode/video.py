"""Frame-exact video decode: metadata, then each window's sampled frames resized to the model's size.

Frame i is the i-th frame in presentation order. decord is fast and exact on h264, hevc, vp8 and vp9 in
mp4/mov/mkv/webm, so it serves those. Elsewhere its random access returns other frames than asked (MPEG-4
Part 2 with B-frames; anything in AVI, whose index has no presentation timestamps) or it cannot open the
file (AV1), so every other file is decoded sequentially with PyAV: decode in order, keep the wanted frames,
stop after the last one.

The frame count comes from demuxing the stream (packets are read, nothing is decoded), not from the
header: a truncated file whose header says 444 frames yields only the frames it really holds. Which frames
each window samples is decided in `windows.py`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import av
import numpy as np

from model.pixels import resize_video_frames
from pipeline.decode.files import DecodeError, ObjectStream, open_input
from pipeline.decode.shared_memory import output_array
from pipeline.decode.windows import VideoDecodeConfig, VideoInfo, Window, check_limits, plan_windows
from pipeline.rows import error_row

DECORD_CODECS = frozenset({"h264", "hevc", "vp8", "vp9"})
DECORD_CONTAINERS = ("mp4", "mov", "matroska", "webm")  # substrings of PyAV's format names
DECODE_BATCH_BYTES = 1 << 27  # source-resolution frames per decord batch: bounds memory, not frame count
MAX_PACKET_ERRORS = 64  # a stream with more undecodable packets than this is called damaged


def _open(source: str | ObjectStream, uri: str) -> tuple[av.container.InputContainer, av.VideoStream]:
    if not isinstance(source, str):
        source.seek(0)  # opened once to probe, again to decode
    try:
        container = av.open(source, metadata_errors="ignore")
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


def _probe(source: str | ObjectStream, uri: str, count_frames: bool) -> tuple[VideoInfo, list[int] | None]:
    container, stream = _open(source, uri)
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
            # int / int is correctly rounded in Python: the same floats as Fraction arithmetic, and cheaper.
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
    with open_input(uri, stream="if_too_big") as source:
        return _probe(source, uri, count_frames)[0]


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
    source: str | ObjectStream,
    windows: list[Window],
    info: VideoInfo,
    pts: list[int] | None,
    cfg: VideoDecodeConfig,
):
    """Sequential decode keeping the wanted frames. A frame the decoder skips is replaced by the next one,
    and the row reports the index really used."""
    pts_index = {p: i for i, p in enumerate(pts)} if pts is not None else None
    targets = [
        (index, w, slot)
        for w, window in enumerate(windows)
        for slot, index in enumerate(window.frame_indices)
    ]
    container, stream = _open(source, info.uri)
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
    # A remote video is copied to the temporary disk (decord needs a file, and decoding reads it a second
    # time); one too big for that disk is streamed to PyAV instead.
    with open_input(uri, stream="if_too_big") as source:
        started = time.perf_counter()
        info, pts = _probe(source, uri, count_frames=True)
        check_limits(info, cfg)
        windows = plan_windows(info, cfg)
        backend = choose_backend(info, cfg) if isinstance(source, str) else "pyav"
        warning = _header_warning(info)
        done = 0
        while done < len(windows):
            todo = windows[done:]
            decode = _decord_windows if backend == "decord" else _pyav_windows
            args = (source, todo, info, cfg) if backend == "decord" else (source, todo, info, pts, cfg)
            try:
                for window, frames, used in decode(*args):
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
        "pixels": frames,
        "frame_count": len(used),
        "frame_indices": used,
        "frame_timestamps": [info.timestamp(i) for i in used],
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
