"""The ranks of a tensor-parallel engine: processes the engine starts and owns, each with a model shard.

Rank 0 is the engine's own process: it schedules, samples, encodes its share of the vision calls and
tells the others what to compute. Ranks 1..N-1 are child processes (running `main` below) that
join a torch.distributed group through a file store in a private temporary directory (never a fixed port,
so two engines on one node cannot meet), load their shard (model/parallel.py: only their slices are read)
and then follow rank 0's commands: a step's inputs (model_runner.StepInputs) by broadcast; each vision
call's pixel values to the rank that encodes it and its embeddings back, by point-to-point sends. Tensors
go by NCCL on CUDA and by gloo on CPU; the commands' small headers always by gloo.

A dead rank must not hang the engine: under gloo rank 0's next collective fails at once and the engine
raises RankFailed; where a collective could wait for ever (NCCL), a watchdog ends the process after
RANK_DEATH_GRACE_S, which a Ray actor's restart turns into a fresh worker. A rank dies with the thread
that started it (PR_SET_PDEATHSIG), so keep the engine on the thread that built it. torch.distributed
has one default group per process, hence one tensor-parallel engine per process at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence as Seq
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from model.parallel import TensorParallel

RANK_DEATH_GRACE_S = 30.0  # after a rank died, how long a blocked collective may take to fail by itself
STOP_WAIT_S = 10.0
RANK_ENTRY = "import sys; from model.engine.ranks import main; main(sys.argv)"
_PR_SET_PDEATHSIG = 1


class RankFailed(RuntimeError):
    """A rank of a tensor-parallel engine died, or a step failed on one: the ranks are out of step and the
    engine cannot go on (a GPU worker ends so that a fresh one takes its work)."""

    exit_status = 70  # a process ended for it (by the watchdog or a GPU worker)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r computes on cuda:r of the GPUs visible to the engine (its Ray actor's), or on the CPU."""
    if device.type != "cuda":
        return device
    if device.index not in (None, 0):
        raise ValueError(f"a tensor-parallel engine runs on cuda:0..N-1 of the visible GPUs, not on {device}")
    return torch.device("cuda", rank)


def _join(store_dir: str, rank: int, size: int, device: torch.device) -> tuple[TensorParallel, Any]:
    """Join the engine's process group: this rank's TensorParallel and the gloo group for commands."""
    import torch.distributed as dist

    if Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank is on this machine: loopback only
    store = dist.FileStore(str(Path(store_dir) / "store"), size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Ranks wait for commands as long as the engine idles: no collective timeout (a dead peer is found by
    # its closed connection or the watchdog, not by a clock).
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timedelta(days=365))
    control = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    return TensorParallel(rank, size, dist.group.WORLD), control


def agree_min(value: int, tp: TensorParallel) -> int:
    """The smallest of the ranks' values (e.g. the KV blocks each one's memory holds)."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend(tp.group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=tp.group)
    return int(t.item())


class Wire:
    """Commands from rank 0 to the others: a header (kind, picklable metadata, tensor shapes) broadcast by
    gloo, then the tensors broadcast by the tensor group."""

    def __init__(self, tp: TensorParallel, control: Any, device: torch.device):
        self.tp, self.control, self.device = tp, control, device

    def send(self, kind: str, meta: Any = None, tensors: Seq[torch.Tensor | None] = ()) -> None:
        import torch.distributed as dist

        specs = [None if t is None else (tuple(t.shape), t.dtype) for t in tensors]
        dist.broadcast_object_list([(kind, meta, specs)], src=0, group=self.control)
        for t in tensors:
            if t is not None:
                dist.broadcast(t.to(self.device).contiguous(), src=0, group=self.tp.group)

    def recv(self) -> tuple[str, Any, list[torch.Tensor | None]]:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        kind, meta, specs = box[0]
        tensors: list[torch.Tensor | None] = []
        for spec in specs:
            if spec is None:
                tensors.append(None)
                continue
            t = torch.empty(spec[0], dtype=spec[1], device=self.device)
            dist.broadcast(t, src=0, group=self.tp.group)
            tensors.append(t)
        return kind, meta, tensors


def assign_vision_calls(sizes: list[int], ranks: int) -> list[int]:
    """The rank that encodes each call: the biggest calls first, each to the least loaded rank."""
    load, owners = [0] * ranks, [0] * len(sizes)
    for j in sorted(range(len(sizes)), key=lambda j: -sizes[j]):
        owners[j] = min(range(ranks), key=lambda r: (load[r], r))
        load[owners[j]] += sizes[j]
    return owners


def _merged_rows(grids: list[tuple[int, int, int]], merge: int) -> int:
    return sum(t * h * w for t, h, w in grids) // merge**2


class Ranks:
    """Rank 0's handle on the ranks it started: commands to them, the watchdog, and close()."""

    def __init__(self, procs: list[subprocess.Popen], store_dir: str, size: int, device: torch.device):
        self.procs, self.store_dir, self.size, self.device = procs, store_dir, size, device
        self.closed = False
        self.busy = True  # starting, or in a step: where a dead rank could leave rank 0 waiting
        self.failure: str | None = None  # why the engine stopped, once it has
        self.tp: TensorParallel | None = None
        self.wire: Wire | None = None
        threading.Thread(target=self._watch, name="tp-watchdog", daemon=True).start()

    @classmethod
    def start(cls, path: str | Path, size: int, dtype: torch.dtype, device: torch.device, settings: dict):
        """Start ranks 1..size-1 on checkpoint `path` and join them as rank 0; `settings` are what every
        rank must agree on (attention backend, block size, KV budget, vision call size, threads)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            raise RuntimeError(
                "a tensor-parallel engine (or another torch.distributed group) already runs in this "
                "process; close it with Engine.close() first"
            )
        device = rank_device(device, 0)
        store_dir = tempfile.mkdtemp(prefix="vlbatch-tp-")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        procs = []
        for rank in range(1, size):
            args = dict(
                settings,
                path=str(path),
                rank=rank,
                size=size,
                store=store_dir,
                dtype=str(dtype).removeprefix("torch."),
                device=str(rank_device(device, rank)),
                parent=os.getpid(),
            )
            # -c rather than -m: the package imports this module, and runpy would run a second copy.
            command = [sys.executable, "-c", RANK_ENTRY, json.dumps(args)]
            procs.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL))
        ranks = cls(procs, store_dir, size, device)
        try:
            tp, control = _join(store_dir, 0, size, device)
        except BaseException:
            ranks.close()
            raise
        ranks.tp, ranks.wire = tp, Wire(tp, control, device)
        return ranks

    @contextlib.contextmanager
    def collective(self):
        """Around everything rank 0 does with the others: a failure there (a dead rank, or a step that
        raised on rank 0 and left the others waiting) ends the group and becomes RankFailed."""
        self.check()
        self.busy = True
        try:
            yield
        except BaseException as e:
            # A peer's closed connection can be seen a moment before its exit status.
            self.failure = self._exited(wait_s=1.0) or f"{type(e).__name__}: {e}"
            self.close(abort=True)
            raise RankFailed(f"tensor-parallel engine stopped: {self.failure}") from e
        finally:
            self.busy = False

    def check(self) -> None:
        """Raise RankFailed if a rank has died or the engine was stopped."""
        if self.closed:
            raise RankFailed(f"tensor-parallel engine stopped earlier: {self.failure or 'it was closed'}")
        if self._exited():
            self.failure = self._exited()
            self.close(abort=True)
            raise RankFailed(f"tensor-parallel engine stopped: {self.failure}")

    def _exited(self, wait_s: float = 0.0) -> str | None:
        """Which rank has exited, and how (looking for up to `wait_s`)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, p in enumerate(self.procs, 1):
                if p.poll() is not None:
                    return f"rank {rank} (pid {p.pid}) exited with status {p.returncode}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def agree_min(self, value: int) -> int:
        with self.collective():
            return agree_min(value, self.tp)

    def started(self) -> None:
        """The engine is built: from now on only steps count as busy. Every rank has joined, and the
        groups are made, so the rendezvous files go now: a process that dies later leaves nothing behind."""
        self.busy = False
        shutil.rmtree(self.store_dir, ignore_errors=True)

    def send_step(self, step) -> None:
        meta = (step.starts, step.num_new_tokens, step.block_tables, step.sample_rows)
        self.wire.send("step", meta, [step.ids, step.positions, step.vis_rows, step.vis_embeds])

    def encode_vision(self, calls: list[tuple[torch.Tensor, list]], runner) -> list[torch.Tensor]:
        """The embeddings of each vision call; the calls are shared among the ranks (their pixel values
        sent to the rank that encodes them, the embeddings sent back)."""
        import torch.distributed as dist

        owners = assign_vision_calls([int(torch.tensor(g).prod(-1).sum()) for _, g in calls], self.size)
        grids = [[tuple(g) for g in grid] for _, grid in calls]
        self.wire.send("vision", (grids, owners, [(tuple(p.shape), p.dtype) for p, _ in calls]))
        sends = [
            dist.isend(p.to(self.device).contiguous(), dst=o, group=self.tp.group)
            for (p, _), o in zip(calls, owners)
            if o != 0
        ]
        out: list[torch.Tensor | None] = [None] * len(calls)
        for j, ((pixels, grid), owner) in enumerate(zip(calls, owners)):
            if owner == 0:
                out[j] = runner.encode_call(pixels, grid)
        merge, hidden = runner.config.vision.spatial_merge_size, runner.config.hidden_size
        for j, owner in enumerate(owners):
            if owner != 0:
                shape = (_merged_rows(grids[j], merge), hidden)
                rows = torch.empty(shape, dtype=runner.dtype, device=self.device)
                dist.recv(rows, src=owner, group=self.tp.group)
                out[j] = rows
        for work in sends:
            work.wait()
        return out

    def close(self, abort: bool = False) -> None:
        """Stop the ranks (at once if `abort`), leave the process group, remove the rendezvous files."""
        if self.closed:
            return
        self.closed = True
        import torch.distributed as dist

        if not abort and self.wire is not None:
            with contextlib.suppress(Exception):
                self.wire.send("stop")
        deadline = time.monotonic() + (0 if abort else STOP_WAIT_S)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.0, deadline - time.monotonic()))
            if p.poll() is None:
                p.kill()
                p.wait()
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        shutil.rmtree(self.store_dir, ignore_errors=True)

    def _watch(self) -> None:
        while not self.closed:
            dead = self._exited()
            if dead and not self.closed:
                deadline = time.monotonic() + RANK_DEATH_GRACE_S
                while time.monotonic() < deadline and not self.closed:
                    time.sleep(0.2)
                if not self.closed and self.busy:
                    sys.stderr.write(f"vlbatch: {dead} and rank 0 is still waiting on it; exiting\n")
                    sys.stderr.flush()
                    os._exit(RankFailed.exit_status)
                return
            time.sleep(0.5)


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)


def serve(runner, wire: Wire) -> None:
    """A rank's loop: compute what rank 0 says until it says stop."""
    import torch.distributed as dist

    from model.engine.model_runner import StepInputs

    while True:
        kind, meta, tensors = wire.recv()
        if kind == "stop":
            return
        if kind == "step":
            starts, num_new_tokens, block_tables, sample_rows = meta
            runner.forward(StepInputs(*tensors, starts, num_new_tokens, block_tables, sample_rows))
        elif kind == "vision":
            grids, owners, specs = meta
            for grid, owner, (shape, dtype) in zip(grids, owners, specs):
                if owner == wire.tp.rank:
                    pixels = torch.empty(shape, dtype=dtype, device=wire.device)
                    dist.recv(pixels, src=0, group=wire.tp.group)
                    dist.send(runner.encode_call(pixels, grid).contiguous(), dst=0, group=wire.tp.group)
        else:
            raise RuntimeError(f"unknown command {kind!r} from rank 0")


def main(argv: list[str]) -> None:
    """A rank process: join, load this rank's shard, agree on the KV cache, serve rank 0."""
    import torch.distributed as dist

    from model.engine.kv_cache import CacheShape, num_kv_blocks
    from model.engine.model_runner import ModelRunner
    from model.qwen2vl import Qwen2VL

    args = json.loads(argv[1])
    _die_with_parent(args["parent"])
    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    device, dtype = torch.device(args["device"]), getattr(torch, args["dtype"])
    tp, control = _join(args["store"], args["rank"], args["size"], device)
    model = Qwen2VL.from_pretrained(args["path"], dtype=dtype, device=device, tp=tp)
    kv = args["kv"]
    blocks = kv["num_kv_blocks"] or num_kv_blocks(
        CacheShape.for_model(model.config, args["block_size"], tp),
        dtype,
        device,
        max_tokens=kv["max_tokens"],
        cache_bytes=kv["cache_bytes"],
        fraction=kv["fraction"],
    )
    blocks = agree_min(blocks, tp)
    runner = ModelRunner(model, blocks, args["block_size"], args["max_vision_patches"], args["backend"])
    serve(runner, Wire(tp, control, device))
    dist.destroy_process_group()
