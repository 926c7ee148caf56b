"""The GPU stage: an actor that loads the checkpoint once and keeps one engine full across packs.

Ray Data runs up to `max_packs_in_flight` calls at once on each actor, each in a thread of its own (one pack
per call). Every call hands its units to the worker's `EngineFeeder`, the one thread that owns the engine:
it adds requests while the engine has room and steps it as long as anything is unfinished, so the rows of
a new pack are prefilled beside the decodes of earlier ones and continuous batching never stops at a pack
edge. A call returns its pack's rows as soon as they are all generated.

Why a feeder thread and threaded calls rather than an async UDF: an engine step is blocking GPU/CPU work
that would stall an actor's event loop, and a threaded actor restarted after its process died behaves as
the plain one does (its calls are retried; tests/test_faults.py). Pixels arrive as uint8 at the model's
size; normalisation and patchify run on the model's device when a unit joins the engine, and at most
`max_waiting_bytes` of such model-ready pixels wait there for a slot: the other units of the packs in
flight wait as uint8, so a worker's memory stays flat however long the job. The GPU worker's fault drill
(VLBATCH_FAULT_INFER_EXIT) is described in `pipeline/faults.py`.

With `gpus_per_worker: N > 1` the worker is one actor asking Ray for N GPUs, which Ray places on one node,
and its engine shards the language model over them (model/engine/ranks.py). A rank that dies ends the
worker's process (`end_worker`): no unit is at fault, and Ray's restart brings fresh ranks and redoes the
packs the worker held.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import logging
import math
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from model.engine.ranks import RankFailed
from pipeline.attempts import PackStarts
from pipeline.faults import InferFaults
from pipeline.packing import unpack_table
from pipeline.rows import BUSY_S, INPUT_IDS, PIXELS, RecordModel, error_fields, pixels_at, result_schema
from schemas.jobs import MAX_SEQS_IN_FLIGHT, MAX_STEP_TOKENS, Sampling

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
log = logging.getLogger(__name__)
CPU_WAITING_BYTES = 512 << 20  # model-ready pixels waiting in a CPU worker's engine, unless the job says


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
    """Loads a checkpoint once and builds its one long-lived engine; turns units into engine requests."""

    def __init__(
        self,
        model_path: str,
        dtype: str,
        device: str,
        max_step_tokens: int = MAX_STEP_TOKENS,
        gpu_share: float = 1.0,
        max_model_len: int | None = None,
        max_num_seqs: int = MAX_SEQS_IN_FLIGHT,
        tensor_parallel_size: int = 1,
    ):
        from model.engine import Engine, EngineConfig
        from model.engine.kv_cache import CUDA_KV_CACHE_FRACTION
        from model.processor import Processor

        self.device = pick_device(device)
        self.processor = Processor.from_pretrained(model_path)
        config = EngineConfig(
            max_batch_tokens=max_step_tokens,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            tensor_parallel_size=tensor_parallel_size,
        )
        if self.device.startswith("cuda") and 0 < gpu_share < 1:
            # Workers sharing a GPU each take their share of the memory free at start for the KV cache.
            config.kv_cache_fraction = CUDA_KV_CACHE_FRACTION * gpu_share
        self.engine = Engine.from_pretrained(model_path, config, dtype=DTYPES[dtype], device=self.device)
        self.model = self.engine.model

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

    def request(self, unit: UnitPrompt, sampling: Sampling, json_schema: dict | None = None):
        """The engine request of one unit, its pixels made model-ready on the device; generated under
        `json_schema` if given."""
        from model.engine import Request, SamplingParams

        params = SamplingParams(
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            stop=tuple(sampling.stop),
            seed=sampling.seed,
            json_schema=json_schema,
        )
        return Request(unit.input_ids, **self.vision_inputs(unit), sampling=params)

    def waiting_room_bytes(self, max_waiting_bytes: int | None) -> int:
        """The job's bound on model-ready pixels waiting in the engine, or one sized from the device."""
        if max_waiting_bytes is not None:
            return max_waiting_bytes
        if self.device.startswith("cuda"):
            return torch.cuda.get_device_properties(self.device).total_memory // 50
        return CPU_WAITING_BYTES


def generation_of(output) -> Generation:
    """An engine output as the stage's Generation."""
    seconds = output.timings.get("total_s", 0.0)
    return Generation(output.text, output.finish_reason, output.num_generated_tokens, seconds, output.error)


def failed(error: BaseException | str) -> Generation:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return Generation("", "error", 0, 0.0, text)


class EngineFeeder:
    """The one thread that drives a worker's engine: units from any number of packs go in as room frees,
    each output goes back to the future its pack waits on. It never dies silently: whatever stops it fails
    every future it holds, and later submissions fail at once."""

    def __init__(
        self,
        make_backend: Callable[[], Backend],
        sampling: Sampling,
        max_waiting_bytes: int | None = None,
        json_schema: dict | None = None,
        torch_threads: int | None = None,
    ):
        self.sampling, self.json_schema = sampling, json_schema
        self.inbox: queue.Queue = queue.Queue()
        self.futures: dict[int, concurrent.futures.Future] = {}  # request id -> its unit's future
        self.units: dict[int, UnitPrompt] = {}  # request id -> its unit, until it finishes
        self.waiting_bytes: dict[int, int] = {}  # request id -> model-ready pixel bytes, until admitted
        self.busy_s = 0.0  # seconds in engine steps not yet claimed by a finished pack
        self.broken: str | None = None  # why the thread stopped, if it did
        self.lock = threading.Lock()
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self.thread = threading.Thread(
            target=self._run,
            args=(make_backend, torch_threads, max_waiting_bytes, ready),
            name="engine-feeder",
            daemon=True,
        )
        self.thread.start()
        ready.result()  # a checkpoint that cannot load fails the worker here

    def submit(self, unit: UnitPrompt) -> concurrent.futures.Future:
        """A future of the unit's Generation."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            if self.broken is not None:
                future.set_result(failed(self.broken))
                return future
            self.inbox.put((unit, future))
        return future

    def take_busy_s(self) -> float:
        """Engine seconds since the last call: summed over packs, the worker's busy time, never counted
        twice however packs overlap."""
        with self.lock:
            busy, self.busy_s = self.busy_s, 0.0
        return busy

    def _room(self) -> bool:
        waiting = set(self.engine.waiting_request_ids)
        for rid in [r for r in self.waiting_bytes if r not in waiting]:
            del self.waiting_bytes[rid]  # admitted: its pixels are the engine's to encode and free
        return not self.waiting_bytes or sum(self.waiting_bytes.values()) < self.max_waiting_bytes

    def _add(self, unit: UnitPrompt, future: concurrent.futures.Future) -> None:
        try:
            request = self.backend.request(unit, self.sampling, self.json_schema)
            rid = self.engine.add_request(request)
        except Exception as e:  # a unit the device cannot take: its own error row
            future.set_result(failed(e))
            return
        self.futures[rid], self.units[rid] = future, unit
        pixels = (t for t in (request.pixel_values, request.pixel_values_videos) if t is not None)
        self.waiting_bytes[rid] = sum(t.numel() * t.element_size() for t in pixels)

    def _run(self, make_backend, threads: int | None, waiting: int | None, ready: concurrent.futures.Future):
        # The checkpoint loads on this thread too, so the process has one OpenMP team: this thread's. A
        # second thread's team (the loader's) puts more OpenMP threads than cores in the process,
        # and libgomp then lets waiting threads spin only briefly before they sleep, so every parallel
        # kernel of a decode step pays a futex wake-up (measured in the README, "The GPU stage").
        try:
            if threads is not None:
                torch.set_num_threads(threads)
            self.torch_threads = torch.get_num_threads()
            self.backend: Backend = make_backend()
            self.engine = self.backend.engine
            self.max_waiting_bytes = self.backend.waiting_room_bytes(waiting)
            ready.set_result(None)
        except BaseException as e:
            if isinstance(e, RankFailed) and actor_restarts() == 0:
                end_worker(e)  # a rank lost while starting: once, a fresh worker; again, the job's error
            ready.set_exception(e)
            return
        try:
            self._loop()
        except BaseException as e:
            if isinstance(e, RankFailed) and actor_restarts() is not None:
                end_worker(e)
            with self.lock:
                self.broken = f"the engine thread stopped ({type(e).__name__}: {e})"
            for future in self.futures.values():
                future.set_result(failed(self.broken))
            while True:
                try:
                    _, future = self.inbox.get_nowait()
                except queue.Empty:
                    break
                future.set_result(failed(self.broken))
            log.exception("%s; this worker's packs become error rows, redone by the next run", self.broken)

    def _loop(self) -> None:
        pending: collections.deque = collections.deque()
        idle_steps = 0
        while True:
            if not pending and not self.engine.has_unfinished:
                pending.append(self.inbox.get())  # idle: sleep until a pack arrives
            while True:
                try:
                    pending.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            while pending and self._room():
                self._add(*pending.popleft())
            if not self.engine.has_unfinished:
                continue
            started, steps = time.perf_counter(), self.engine.stats.steps
            try:
                outputs = self.engine.step()
            except RankFailed:
                raise
            except Exception:  # the step failed as a whole: redo its requests one by one
                self._redo_alone()
                continue
            finally:
                with self.lock:
                    self.busy_s += time.perf_counter() - started
            for out in outputs:
                self.units.pop(out.index, None)
                self.waiting_bytes.pop(out.index, None)
                self.futures.pop(out.index).set_result(generation_of(out))
            # A scheduler that finds nothing to run (a request that can never fit) must not spin for ever.
            idle_steps = idle_steps + 1 if self.engine.stats.steps == steps and not outputs else 0
            if idle_steps > 2:
                self._fail_all("the engine made no progress: the scheduler found nothing to run")
                idle_steps = 0

    def _fail_all(self, message: str) -> None:
        self.engine.abort_all()
        for future in self.futures.values():
            future.set_result(failed(message))
        self.futures.clear(), self.units.clear(), self.waiting_bytes.clear()

    def _redo_alone(self) -> None:
        """After a failed step: every unfinished unit alone, so one bad unit cannot sink the others."""
        self.engine.abort_all()
        todo = [(self.units[rid], future) for rid, future in self.futures.items()]
        self.futures.clear(), self.units.clear(), self.waiting_bytes.clear()
        for unit, future in todo:
            try:
                (out,) = self.engine.generate([self.backend.request(unit, self.sampling, self.json_schema)])
                future.set_result(generation_of(out))
            except Exception as e:
                future.set_result(failed(e))


def actor_restarts() -> int | None:
    """0 in a Ray actor's first life, 1 in a restarted one, None outside an actor."""
    try:
        import ray

        context = ray.get_runtime_context()
        if context.get_actor_id() is None:
            return None
        return int(context.was_current_actor_reconstructed)
    except Exception:
        return None


def end_worker(error: RankFailed) -> None:
    """The ranks are out of step: no unit is at fault and this worker cannot go on. Ending the process has
    Ray restart the worker (ranks and all) and redo the packs it held."""
    log.error("%s; ending this GPU worker so that Ray restarts it", error)
    logging.shutdown()
    os._exit(RankFailed.exit_status)


def torch_threads(cpus: float | None) -> int | None:
    """Torch threads of a CPU worker given `cpus`: its CPUs rounded up, never more than the node's cores."""
    if cpus is None:
        return None
    return max(1, min(math.ceil(cpus), os.cpu_count() or 1))


class Infer:
    """Ray Data stage (actor pool, `num_gpus` per actor, threaded calls): packs of prepared rows in, result
    rows out; the packs in flight share the worker's one engine."""

    def __init__(
        self,
        model_path: str,
        record: RecordModel,
        sampling: dict[str, Any],
        dtype: str = "bfloat16",
        device: str = "auto",
        max_step_tokens: int = MAX_STEP_TOKENS,
        gpu_share: float = 1.0,
        faults: InferFaults | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = MAX_SEQS_IN_FLIGHT,
        max_waiting_bytes: int | None = None,
        tensor_parallel_size: int = 1,
        cpu_threads: float | None = None,
        json_schema: dict | None = None,
        starts: PackStarts | None = None,
    ):
        threads = torch_threads(cpu_threads) if pick_device(device) == "cpu" else None
        # Ray sets OMP_NUM_THREADS to the actor's CPUs rounded down (1 for a fraction): a CPU worker computes
        # with the CPUs it was given instead, on the feeder's thread, where all of its torch work runs.
        self.sampling = Sampling.model_validate(sampling)
        args = (model_path, dtype, device, max_step_tokens, gpu_share, max_model_len, max_num_seqs)
        args += (tensor_parallel_size,)
        self.feeder = EngineFeeder(
            lambda: Backend(*args),
            self.sampling,
            max_waiting_bytes,
            json_schema,
            threads,
        )
        self.schema = result_schema(record)
        self.faults = faults or InferFaults()
        self.starts = starts or PackStarts()
        self.lock = threading.Lock()
        self.packs_in_flight = 0  # calls running now: the packs this worker holds

    def run_pack(self, table: pa.Table) -> list[dict[str, Any]]:
        """One pack's rows with their generations; its units share the engine with other packs' units."""
        rows = table.drop_columns([PIXELS]).to_pylist()
        self.starts.check(rows)
        todo = [i for i, r in enumerate(rows) if r["status"] == "ok"]
        futures = [self.feeder.submit(UnitPrompt(rows[i][INPUT_IDS], pixels_at(table, i))) for i in todo]
        for i, future in zip(todo, futures):
            g = future.result()
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
        self.faults.maybe_exit([str(r["uri"]) for r in rows], lambda: self.packs_in_flight)
        if rows:
            rows[0][BUSY_S] = self.feeder.take_busy_s()
        return rows

    def __call__(self, packs: pa.Table) -> pa.Table:
        with self.lock:
            self.packs_in_flight += 1
        try:
            rows = []
            for k in range(packs.num_rows):
                rows.extend(self.run_pack(unpack_table(packs.slice(k, 1))))
        finally:
            with self.lock:
                self.packs_in_flight -= 1
        return pa.Table.from_pylist(rows, schema=self.schema)
