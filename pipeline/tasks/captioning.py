"""Captioning videos: one caption per window of `clip_seconds`, optionally as parsed JSON fields."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

from pipeline.tasks.base import Task
from schemas import CaptionFields, CaptionRecord, CaptionVideosJob
from schemas.fields_schema import closed_schema


class Captioning(Task):
    kind = "caption_videos"
    job = CaptionVideosJob
    record = CaptionRecord
    inputs = "video"
    unit = "windows"
    unit_key = "window_index"
    sample_shape = (2, 28, 28, 3)  # a still: one frame shown twice

    def decode_config(self, job, budget, model_pixels):
        from pipeline.decode.windows import VideoDecodeConfig

        return VideoDecodeConfig.from_job(job, budget, model_pixels)

    def decoder(self, config):
        from pipeline.decode.video import DecodeVideo

        return functools.partial(DecodeVideo, config)

    def unit_shapes(self, uri: str, config) -> Iterator[tuple[list[int], int]]:
        from pipeline.decode.video import probe_video
        from pipeline.decode.windows import check_limits, plan_windows

        info = probe_video(uri, count_frames=True)  # demuxes packets to count frames; decodes nothing
        check_limits(info, config)
        for window in plan_windows(info, config):
            frames = len(window.frame_indices)
            seen = 1 if window.end_frame - window.start_frame == 1 else frames  # a still is one frame
            yield [frames, window.height, window.width, 3], seen

    def fields_schema(self, job: CaptionVideosJob) -> dict[str, Any] | None:
        return job.caption_schema

    def json_schema(self, job: CaptionVideosJob) -> dict[str, Any] | None:
        if job.caption_format != "json":
            return None
        return closed_schema(job.caption_schema or CaptionFields.model_json_schema())

    def finish(self, row: dict[str, Any], job: CaptionVideosJob) -> dict[str, Any]:
        """Structured captions: their typed fields and whether they are valid; plain ones as written."""
        if job.caption_format != "json":
            return row
        return self.parse_fields(row, job)
