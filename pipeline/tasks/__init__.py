"""The job kinds: one task module each (`captioning.py`, `ocr.py`); `task_of(job)` finds a job's task.

Adding a job kind: its spec and record in `schemas/`, a `Task` subclass in a module here, one line below.
"""

from __future__ import annotations

from typing import Any

from pipeline.tasks.base import Task
from pipeline.tasks.captioning import Captioning
from pipeline.tasks.ocr import Ocr

TASKS: dict[str, Task] = {task.kind: task for task in (Captioning(), Ocr())}


def task_of(job: Any) -> Task:
    """The task of a job spec (by its `kind`)."""
    return TASKS[job.kind]


def decode_config(job: Any, processor=None) -> Any:
    """The job's decode settings, every unit sized to fit the model's context (`vlbatch plan` uses it too)."""
    from model.processor import Processor
    from pipeline.budget import token_budget

    processor = processor or Processor.from_pretrained(job.model)
    ip = processor.image_processor
    return task_of(job).decode_config(job, token_budget(job, processor), (ip.min_pixels, ip.max_pixels))


__all__ = ["TASKS", "Task", "decode_config", "task_of"]
