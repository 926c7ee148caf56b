"""A job as a chain of named Ray Data stages; nothing runs until the driver iterates it.

items -> decode (CPU actors) -> prepare (CPU actors) -> pack by tokens -> infer (GPU actors)
      -> postprocess -> driver (`driver.py`): assemble whole items, commit Parquet, manifest
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict
from typing import Any

from pipeline import storage
from pipeline.attempts import PackStarts
from pipeline.budget import model_context
from pipeline.decode.stage import DecodeUnits, make_decoder
from pipeline.faults import InferFaults
from pipeline.infer import Infer
from pipeline.packing import pack_table
from pipeline.postprocess import Postprocess
from pipeline.prepare import Prepare
from pipeline.sources import Item
from pipeline.tasks import task_of
from schemas import JobBase

PACK_WINDOW_ROWS = 64  # rows the packer sees at once: enough to fill packs, few enough to bound memory
# Ray Data keeps bookkeeping per block in the driver until the dataset ends (each operator's stats of every
# block it produced, the input blocks themselves): a job of one block per item grew by KiBs per item. Past
# this many items a block holds several, so the driver holds what it holds for this many blocks.
MAX_INPUT_BLOCKS = 1000
# ...and more where there are many decode workers: the last block is the job's tail, which one worker decodes
# while the others have nothing left; with this many blocks per worker it stays a small part of the job.
INPUT_BLOCKS_PER_DECODE_WORKER = 50
# The pack stage asks for what the one-pack-per-block repartition after it takes (Ray gives that no CPU
# setting: one CPU), so Ray fuses the two into one task; with less, the repartition ran as a stage of its own
# whose CPU nobody counted, and where the actor pools held every CPU, finished packs waited for it.
PACK_CPUS = 1.0
POSTPROCESS_CPUS = 0.25


def gpus_per_infer_worker(job: JobBase) -> float:
    """0 on a CPU-only cluster or for device=cpu; the spec's share where the cluster has GPUs."""
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    if job.device == "cpu":
        return 0.0
    if job.device == "cuda" and cluster_gpus == 0:
        raise ValueError("device: cuda, but the Ray cluster has no GPUs; use device: auto or cpu")
    return job.resources.gpus_per_worker if cluster_gpus > 0 else 0.0


def cpus_beside_infer(job: JobBase) -> float:
    """CPUs the other stages hold at most at once: the decode pool, the prepare pool at its largest (it
    grows to decode_workers actors), one pack task and one postprocess task."""
    r = job.resources
    return r.decode_workers * (r.cpus_per_decode_worker + min(1.0, r.cpus_per_decode_worker)) + (
        PACK_CPUS + POSTPROCESS_CPUS
    )


def infer_cpus(job: JobBase, num_gpus: float) -> float:
    """CPUs of each inference actor: the spec's, else 0.5 beside a GPU; on a CPU-only cluster what the
    decode workers, the prepare pool and the light stages leave (the actor computes on them)."""
    import ray

    r = job.resources
    if r.cpus_per_gpu_worker is not None:
        return r.cpus_per_gpu_worker
    if num_gpus > 0:
        return 0.5
    # Counting the other stages at their largest keeps the pools from taking the CPUs the light tasks need.
    left = ray.cluster_resources().get("CPU", 1.0) - cpus_beside_infer(job)
    # Never more than this node's cores: logical CPUs beyond them add no compute, and an actor holding
    # them all starves the next run's pools while a restarted worker of this one is still shutting down.
    return max(1.0, min(math.floor(left / r.gpu_workers * 4) / 4, float(os.cpu_count() or 1)))


def input_blocks(items: int, decode_workers: int) -> int:
    """Blocks of the job's item list: one per item, up to a cap that keeps the driver's bookkeeping small."""
    return max(1, min(items, max(MAX_INPUT_BLOCKS, INPUT_BLOCKS_PER_DECODE_WORKER * decode_workers)))


def packs_in_flight(n: int) -> dict[str, Any]:
    """Actor-pool settings for `n` packs at once per inference worker, each call in a thread of its own."""
    if n == 1:
        return {}
    return {
        "max_tasks_in_flight_per_actor": n,
        "max_concurrent_calls_per_actor": n,
        "enable_true_multi_threading": True,  # each call waits on the shared engine in its own thread
    }


def build_dataset(
    job: JobBase, items: list[Item], job_id: str, model: tuple[str, str], pack_ledger: Any = None
):
    """The chain of stages over `items`; `model` is the checkpoint's (name, fingerprint); `pack_ledger`
    (pipeline/attempts.py) bounds the starts of each pack on the GPU workers."""
    import ray.data
    from ray.data import ActorPoolStrategy

    task, r = task_of(job), job.resources
    record = task.output_record(job)
    num_gpus = gpus_per_infer_worker(job)
    device = job.device if job.device != "auto" else ("cuda" if num_gpus > 0 else "cpu")
    # One item per input block (up to a cap) so the decode pool balances items, not block-sized chunks.
    blocks = input_blocks(len(items), r.decode_workers)
    ds = ray.data.from_items([asdict(it) for it in items], override_num_blocks=blocks)
    ds = ds.map_batches(
        DecodeUnits,
        fn_constructor_kwargs={"make_decoder": make_decoder(job), "record": record, "job_id": job_id},
        batch_size=1,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=r.decode_workers),
        num_cpus=r.cpus_per_decode_worker,
        **storage.worker_env(),  # decode workers fetch their items themselves
    )
    ds = ds.map_batches(
        Prepare,
        fn_constructor_kwargs={
            "model_path": job.model,
            "record": record,
            "prompt": job.prompt,
            "system_prompt": job.system_prompt,
        },
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=r.decode_workers),
        num_cpus=min(1.0, r.cpus_per_decode_worker),
    )
    ds = ds.map_batches(
        pack_table,
        fn_kwargs={"max_pack_tokens": r.max_pack_tokens},
        batch_size=PACK_WINDOW_ROWS,
        batch_format="pyarrow",
        num_cpus=PACK_CPUS,
    )
    # One pack per block: an actor task takes one block and calls the stage on its batches one after the
    # other, so packs sharing a block could never be in flight on a worker at once.
    ds = ds.repartition(target_num_rows_per_block=1)
    cpus = infer_cpus(job, num_gpus)
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for actor restarts yet, and warns on the generic ones.
        warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated", category=Warning)
        ds = ds.map_batches(
            Infer,
            fn_constructor_kwargs={
                "model_path": job.model,
                "record": record,
                "dtype": job.dtype,
                "device": device,
                "sampling": job.sampling.model_dump(),
                "max_step_tokens": r.max_step_tokens,
                "max_model_len": model_context(job.model, job.max_model_len),
                "max_num_seqs": r.max_seqs_in_flight,
                "max_waiting_bytes": r.max_waiting_bytes,
                "tensor_parallel_size": r.tensor_parallel_size,
                "cpu_threads": cpus,
                "gpu_share": num_gpus,
                "faults": InferFaults.for_output(job.output),
                "json_schema": task.json_schema(job),
                "starts": PackStarts(pack_ledger, job.limits.infer_retries),
            },
            batch_size=1,  # one pack per call; several calls at once keep the engine full across packs
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=r.gpu_workers, **packs_in_flight(r.max_packs_in_flight)),
            num_gpus=num_gpus,
            num_cpus=cpus,
            # A dead GPU worker is restarted (model loaded again) and its batches redone. Ray retries them
            # without end; the pack ledger bounds how often each one starts (limits.infer_retries), which
            # Ray's own bound cannot: it also spends retries on a worker still loading its model. Rows of
            # a first attempt that already reached the driver are dropped there as repeats.
            max_restarts=-1,
            max_task_retries=-1,
        )
    return ds.map_batches(Postprocess(job, *model), batch_format="pyarrow", num_cpus=POSTPROCESS_CPUS)
