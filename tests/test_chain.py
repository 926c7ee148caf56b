"""The chain of stages fits the Ray it runs on: in a local Ray every stage gets its CPUs at once (a stage left
without them holds back every pack behind it), and packs reach the GPU stage one to a block."""

from __future__ import annotations

import pytest

from jobs.run import local_cpus
from pipeline.chain import build_dataset
from schemas import validate_job

RESOURCES = [
    {},  # the defaults
    {"decode_workers": 1, "cpus_per_decode_worker": 0.5},
    {"decode_workers": 4, "cpus_per_decode_worker": 2, "gpu_workers": 2},
    {"decode_workers": 3, "cpus_per_gpu_worker": 3},
]


def physical_stages(ds) -> list:
    """The operators Ray Data runs for `ds`, after its fusion rules, input first."""
    from ray.data._internal.logical.optimizers import get_execution_plan

    op, stages = get_execution_plan(ds._logical_plan)[0].dag, []
    while op.input_dependencies:
        stages.append(op)
        op = op.input_dependencies[0]
    return stages[::-1]


def cpus_at_most(stage) -> float:
    """What Ray Data's resource manager counts a stage at: an actor pool at its largest, a task stage at one
    task (the least with which it makes progress)."""
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

    if isinstance(stage, ActorPoolMapOperator):
        return stage.min_max_resource_requirements()[1].cpu
    return stage.per_task_resource_allocation().cpu


def settings(resources: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in resources.items()) or "defaults"


@pytest.mark.parametrize("resources", RESOURCES, ids=settings)
def test_every_stage_gets_its_cpus_at_once_in_a_local_ray(resources, tiny_checkpoint, ray_local, monkeypatch,
                                                          tmp_path):  # fmt: skip
    job = validate_job({"kind": "ocr_documents", "inputs": [str(tmp_path)], "output": str(tmp_path / "out"),
                        "model": str(tiny_checkpoint), "device": "cpu", "resources": resources})  # fmt: skip
    cpus = local_cpus(job)
    # The CPU-only GPU stage sizes itself from the cluster: let it see the Ray `vlbatch run` would start.
    monkeypatch.setattr(ray_local, "cluster_resources", lambda: {"CPU": float(cpus)})
    stages = physical_stages(build_dataset(job, [], "j", ("m", "f")))
    asked = {stage.name: cpus_at_most(stage) for stage in stages}
    assert sum(asked.values()) <= cpus, f"a local Ray of {cpus} CPUs, the stages ask for {asked}"
    # A stage Ray gives no CPU setting would take a CPU unaccounted: the repartition rides in the pack's task.
    assert [stage.name for stage in stages] == [
        "MapBatches(DecodeUnits)",
        "MapBatches(Prepare)",
        "MapBatches(pack_table)->StreamingRepartition[num_rows_per_block=1,strict=False]",
        "MapBatches(Infer)",
        "MapBatches(Postprocess)",
    ]


def test_input_blocks_are_one_per_item_up_to_a_cap_that_grows_with_the_decode_workers():
    from pipeline.chain import INPUT_BLOCKS_PER_DECODE_WORKER, MAX_INPUT_BLOCKS, input_blocks

    assert [input_blocks(n, 2) for n in (0, 1, 7, MAX_INPUT_BLOCKS)] == [1, 1, 7, MAX_INPUT_BLOCKS]
    assert input_blocks(100_000, 2) == MAX_INPUT_BLOCKS  # the driver's per-block bookkeeping stays bounded
    many = 2 * MAX_INPUT_BLOCKS // INPUT_BLOCKS_PER_DECODE_WORKER
    assert input_blocks(100_000, many) == INPUT_BLOCKS_PER_DECODE_WORKER * many  # the tail stays small
