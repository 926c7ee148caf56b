"""How a bench hands over its figures: one summary line, the figures as JSON, and optionally a file."""

from __future__ import annotations

import json
from pathlib import Path


def report(summary: str, figures: dict, json_path: str | None = None) -> None:
    """Print `summary` and `figures` (one JSON line, for scripts such as bench/gpu.sh); write them to
    `json_path` too if given."""
    print(summary)
    print(json.dumps(figures))
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2))
