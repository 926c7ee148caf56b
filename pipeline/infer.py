"""The GPU stage: an actor that loads the checkpoint once and generates for packs of unit rows.

Each actor holds one long-lived engine (`model.engine`, continuous batching). Pixels arrive as uint8 at the
model's size; normalisation and patchify run on the model's device. The GPU worker's fault drill
(VLBATCH_FAULT_INFER_EXIT) is described in `pipeline/faults.py`.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipeline.faults import InferFaults
from pipeline.packing import unpack_table
from pipeline.rows import BUSY_S, INPUT_IDS, PIXELS, RecordModel, error_fields, pixels_at, result_schema
from schemas.jobs import MAX_BATCH_TOKENS, Sampling

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(device: str) -> str:
    """'auto' is cuda when this worker sees a GPU, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def model_identity(path: str | Path) -> tuple[str, str]:
    """(name, fingerprint) of a checkpoint: its directory name and a hash of its config and weight files'
    names and sizes (hashing the weights themselves would read gigabytes)."""
    path = Path(path)
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json"):
        if not (path / name).is_file():
            raise ValueError(f"{path}: no {name}; --model must point at a Qwen2-VL checkpoint directory")
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.safetensors.index.json")):
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
    return path.resolve().name, h.hexdigest()[:16]


@dataclass
class UnitPrompt:
    """One unit's prompt ids and its uint8 pixels ([T, H, W, 3] video or [H, W, 3] image)."""

    input_ids: list[int]
    pixels: np.ndarray


@dataclass
class Generation:
    text: str
    finish_reason: str  # stop, length, error
    generated_tokens: int
    seconds: float
    error: str | None = None


class Backend:
    """Loads a checkpoint once; turns unit prompts into generations through one long-lived engine
    (continuous batching: the whole pack goes to the engine at once)."""

    def __init__(
        self,
        model_path: str,
        dtype: str,
        device: str,
        max_batch_tokens: int,
        gpu_share: float = 1.0,
        max_model_len: int | None = None,
    ):
        from model.config import read_eos_token_ids
        from model.engine import Engine, EngineConfig
        from model.engine.kv_cache import CUDA_KV_CACHE_FRACTION
        from model.processor import Processor
        from model.qwen2vl import Qwen2VL

        self.device = pick_device(device)
        self.processor = Processor.from_pretrained(model_path)
        self.model = Qwen2VL.from_pretrained(model_path, dtype=DTYPES[dtype], device=self.device)
        config = EngineConfig(max_batch_tokens=max(max_batch_tokens, 256), max_model_len=max_model_len)
        if self.device.startswith("cuda") and 0 < gpu_share < 1:
            # Workers sharing a GPU each take their share of the memory free at start for the KV cache.
            config.kv_cache_fraction = CUDA_KV_CACHE_FRACTION * gpu_share
        eos = read_eos_token_ids(model_path)
        self.engine = Engine(self.model, config, self.processor.tokenizer, eos)

    def vision_inputs(self, unit: UnitPrompt) -> dict[str, torch.Tensor]:
        """Normalised patches and grid, computed from uint8 on the model's device."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only Arrow buffer: torch only reads it
            frames = torch.as_tensor(unit.pixels).to(self.device, non_blocking=True)
        video = frames.ndim == 4
        pixel_values, grid = self.processor.image_processor.patchify(frames if video else frames[None])
        pixel_values = pixel_values.to(self.model.dtype)
        if video:
            return {"pixel_values_videos": pixel_values, "video_grid_thw": grid}
        return {"pixel_values": pixel_values, "image_grid_thw": grid}

    def generate(self, units: list[UnitPrompt], sampling: Sampling) -> list[Generation]:
        from model.engine import Request, SamplingParams

        params = SamplingParams(
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            stop=tuple(sampling.stop),
            seed=sampling.seed,
        )
        requests = [Request(u.input_ids, **self.vision_inputs(u), sampling=params) for u in units]
        outputs = self.engine.generate(requests)
        return [
            Generation(
                o.text, o.finish_reason, o.num_generated_tokens, o.timings.get("total_s", 0.0), o.error
            )
            for o in outputs
        ]


class Infer:
    """Ray Data stage (actor pool, `num_gpus` per actor): packs of prepared rows in, result rows out."""

    def __init__(
        self,
        model_path: str,
        record: RecordModel,
        sampling: dict[str, Any],
        dtype: str = "bfloat16",
        device: str = "auto",
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        gpu_share: float = 1.0,
        faults: InferFaults | None = None,
        max_model_len: int | None = None,
    ):
        self.backend = Backend(model_path, dtype, device, max_batch_tokens, gpu_share, max_model_len)
        self.sampling = Sampling.model_validate(sampling)
        self.schema = result_schema(record)
        self.faults = faults or InferFaults()

    def generate(self, units: list[UnitPrompt]) -> list[Generation]:
        """All at once; if the pack fails as a whole, unit by unit so one bad row cannot sink the others."""
        try:
            return self.backend.generate(units, self.sampling)
        except Exception:
            if len(units) == 1:
                raise
        out = []
        for u in units:
            try:
                out.extend(self.backend.generate([u], self.sampling))
            except Exception as e:
                out.append(Generation("", "error", 0, 0.0, f"{type(e).__name__}: {e}"))
        return out

    def run_pack(self, table: pa.Table) -> list[dict[str, Any]]:
        started = time.perf_counter()
        rows = table.drop_columns([PIXELS]).to_pylist()
        todo = [i for i, r in enumerate(rows) if r["status"] == "ok"]
        units = [UnitPrompt(rows[i][INPUT_IDS], pixels_at(table, i)) for i in todo]
        try:
            generations = self.generate(units) if units else []
        except Exception as e:
            generations = [Generation("", "error", 0, 0.0, f"{type(e).__name__}: {e}")] * len(units)
        for i, g in zip(todo, generations):
            row = rows[i]
            row.update(
                text=g.text,
                finish_reason=g.finish_reason,
                generated_tokens=g.generated_tokens,
                infer_s=g.seconds,
            )
            if g.finish_reason == "error":
                row.update(error_fields(row["uri"], "infer", g.error or "generation failed"))
        # The drill strikes after the work, before its results leave: the worst moment to die.
        self.faults.maybe_exit([str(r["uri"]) for r in rows])
        if rows:
            rows[0][BUSY_S] = time.perf_counter() - started
        return rows

    def __call__(self, packs: pa.Table) -> pa.Table:
        rows = []
        for k in range(packs.num_rows):
            rows.extend(self.run_pack(unpack_table(packs.slice(k, 1))))
        return pa.Table.from_pylist(rows, schema=self.schema)
