"""The GPU stage keeps one engine full: packs that arrive while earlier ones decode join the same steps,
and on a CPU-only machine the worker computes with the CPUs it was given."""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest

from pipeline.chain import infer_cpus
from pipeline.decode.stage import DecodeUnits, make_decoder
from pipeline.infer import Infer
from pipeline.packing import pack_table
from pipeline.prepare import Prepare
from pipeline.sources import expand_inputs
from schemas import PageRecord, validate_job


@pytest.fixture(scope="module")
def page_packs(pipeline_corpus):
    """Prepared pages of the corpus' documents, cut into packs of one page each."""
    job = validate_job({**pipeline_corpus["ocr"], "sampling": {"max_new_tokens": 12}})
    items = expand_inputs(job.inputs, "document")
    decode = DecodeUnits(make_decoder(job, isolated=False), PageRecord, "j")
    decoded = pa.concat_tables(t for it in items for t in decode(pa.Table.from_pylist([it.__dict__])))
    prepared = Prepare(job.model, PageRecord, job.prompt)(decoded)
    packs = pack_table(prepared, max_pack_tokens=1)  # every page travels alone
    return job, [packs.slice(k, 1) for k in range(packs.num_rows)]


def test_a_pack_that_arrives_while_others_decode_shares_their_steps(page_packs):
    job, packs = page_packs
    infer = Infer(job.model, PageRecord, job.sampling.model_dump(), dtype="float32", device="cpu")
    engine = infer.feeder.engine
    steps: list[set[int]] = []
    schedule = engine.scheduler.schedule

    def logged():
        batch = schedule()
        steps.append({s.index for s in batch.seqs})
        return batch

    engine.scheduler.schedule = logged

    def late(pack):
        while len(steps) < 3:  # the first packs are decoding by now
            time.sleep(0.01)
        return infer(pack)

    with ThreadPoolExecutor(3) as pool:  # as Ray runs the calls of a threaded actor
        calls = [pool.submit(infer, packs[0]), pool.submit(infer, packs[1]), pool.submit(late, packs[2])]
        first, second, third = (c.result(timeout=600) for c in calls)
    assert [t.num_rows for t in (first, second, third)] == [1, 1, 1]
    for table in (first, second, third):
        (row,) = table.to_pylist()
        assert row["status"] == "ok" and 1 <= row["generated_tokens"] <= 12
    # Request ids are given in submission order: 0 and 1 from the first packs, 2 from the late one.
    assert any({0, 2} <= step or {1, 2} <= step for step in steps), steps
    busy = sum(t.column("busy_s").to_pylist()[0] or 0 for t in (first, second, third))
    assert 0 < busy  # engine time, claimed once however the packs overlapped


def test_a_unit_that_breaks_the_engine_thread_fails_its_pack_instead_of_hanging(page_packs, monkeypatch):
    job, packs = page_packs
    infer = Infer(job.model, PageRecord, job.sampling.model_dump(), dtype="float32", device="cpu")

    def broken():
        raise SystemExit("the feeder's loop itself failed")

    monkeypatch.setattr(infer.feeder.engine.scheduler, "schedule", broken)
    (row,) = infer(packs[0]).to_pylist()
    assert row["status"] == "error" and "the engine thread stopped" in row["error_message"]
    (later,) = infer(packs[1]).to_pylist()  # later packs fail at once too, never wait for ever
    assert later["status"] == "error" and later["error_stage"] == "infer"


def test_a_cpu_worker_computes_with_the_cpus_it_was_given(page_packs, ray_local):
    ray = ray_local
    job, _ = page_packs
    cpus = infer_cpus(job, num_gpus=0)
    assert cpus >= 1

    @ray.remote(num_cpus=cpus)
    def threads_in_an_infer_worker() -> tuple[int, str | None]:
        sampling = job.sampling.model_dump()
        infer = Infer(job.model, PageRecord, sampling, dtype="float32", device="cpu", cpu_threads=cpus)
        return infer.feeder.torch_threads, os.environ.get("OMP_NUM_THREADS")

    threads, omp = ray.get(threads_in_an_infer_worker.remote())
    assert threads == min(math.ceil(cpus), os.cpu_count())
    assert omp is not None  # Ray did pin the worker's threads; the stage set them from its CPUs


def test_all_torch_work_of_a_worker_runs_on_its_engine_thread(page_packs, monkeypatch):
    """Loading, pixel preparation and steps share one thread: a second thread's OpenMP team would make
    every CPU kernel of a step sleep and wake (see EngineFeeder._run)."""
    import pipeline.infer as infer_module

    job, packs = page_packs
    seen: dict[str, set[str]] = {"load": set(), "request": set(), "step": set()}

    class Recorded(infer_module.Backend):
        def __init__(self, *args, **kwargs):
            seen["load"].add(threading.current_thread().name)
            super().__init__(*args, **kwargs)

        def request(self, *args, **kwargs):
            seen["request"].add(threading.current_thread().name)
            return super().request(*args, **kwargs)

    monkeypatch.setattr(infer_module, "Backend", Recorded)
    infer = Infer(job.model, PageRecord, job.sampling.model_dump(), dtype="float32", device="cpu")
    step = infer.feeder.engine.step

    def recorded_step():
        seen["step"].add(threading.current_thread().name)
        return step()

    infer.feeder.engine.step = recorded_step
    with ThreadPoolExecutor(2) as pool:  # calls from other threads, as Ray makes them
        tables = list(pool.map(infer, packs[:2]))
    assert all(t.column("status").to_pylist() == ["ok"] for t in tables)
    assert seen == {"load": {"engine-feeder"}, "request": {"engine-feeder"}, "step": {"engine-feeder"}}
