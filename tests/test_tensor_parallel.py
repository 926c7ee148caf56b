"""Tensor parallelism: the language model sharded over ranks (gloo on the CPU here), vision replicated.

Every test that starts ranks has a hard timeout (faulthandler ends the whole run with a traceback): a
collective that waits for a dead rank must fail the test, never hang CI.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_engine import mixed_messages

from model import Qwen2VLConfig
from model.engine import Engine, EngineConfig, Request, SamplingParams
from model.engine.ranks import RANK_ENTRY, RankFailed, assign_vision_calls
from model.parallel import TensorParallel, check_layout, rank_parameter_counts
from model.processor import Processor
from model.qwen2vl import Qwen2VL
from model.weights import load_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "model" / "configs"
HEADS = {"2b": (12, 2), "7b": (28, 4), "72b": (64, 8)}  # query and key/value heads of the decoder


@pytest.fixture
def hard_timeout():
    faulthandler.dump_traceback_later(240, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def expected_rank_parameters(c: Qwen2VLConfig, size: int) -> int:
    """One rank's parameters, from the published shapes by hand: heads, MLP and vocabulary split by
    `size`, key/value heads split or (fewer than ranks) one each, norms and the vision tower whole."""
    d, hidden = c.head_dim, c.hidden_size
    q, kv = c.num_attention_heads // size, max(1, c.num_key_value_heads // size)
    attention = q * d * (hidden + 1) + 2 * kv * d * (hidden + 1) + q * d * hidden
    mlp = 3 * hidden * c.intermediate_size // size
    layer = attention + mlp + 2 * hidden
    vocab = -(-c.vocab_size // size) * hidden * (1 if c.tie_word_embeddings else 2)
    with torch.device("meta"):
        vision = sum(p.numel() for p in Qwen2VL(c).visual.parameters())
    return c.num_hidden_layers * layer + hidden + vocab + vision


@pytest.mark.parametrize("size", ["2b", "7b", "72b"])
def test_per_rank_parameters_of_the_published_configs(size):
    c = Qwen2VLConfig.from_json(CONFIGS / f"qwen2-vl-{size}-instruct.json")
    assert (c.num_attention_heads, c.num_key_value_heads) == HEADS[size]
    whole = rank_parameter_counts(c, 1)[0]
    for tp in (1, 2, 4, 8):
        if c.num_attention_heads % tp:  # 2B and 7B have 12 and 28 heads: no split in 8
            with pytest.raises(ValueError, match=f"tensor_parallel_size={tp} does not split.*use one of"):
                check_layout(c, tp)
            continue
        counts = rank_parameter_counts(c, tp)
        assert counts == [expected_rank_parameters(c, tp)] * tp, (size, tp)
    if size == "72b":
        assert 73.0e9 < whole < 73.8e9  # the paper's 73.4B: 147 GB in bf16, more than one H200 holds


def test_loading_reads_only_a_ranks_share(tiny_checkpoint, monkeypatch):
    """A rank's load asks safetensors for its slices of every split tensor, never the whole tensor: the
    elements read are exactly the shard's parameters."""
    import model.weights as weights

    read: dict[str, int] = {}
    real_open = weights.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            t = self.f.get_tensor(key)
            read[key] = t.numel()
            return t

        def get_slice(self, key):
            part = self.f.get_slice(key)

            class Slice:
                def get_shape(self):
                    return part.get_shape()

                def __getitem__(self, index):
                    t = part[index]
                    read[key] = t.numel()
                    return t

            return Slice()

    monkeypatch.setattr(weights, "safe_open", Recording)
    config = Qwen2VLConfig.from_json(tiny_checkpoint)
    whole = rank_parameter_counts(config, 1)[0]
    for rank in range(2):
        read.clear()
        with torch.device("meta"):
            shard = Qwen2VL(config, TensorParallel(rank, 2))
        load_checkpoint(shard, tiny_checkpoint, torch.float32, "cpu")
        held = sum(p.numel() for p in shard.parameters())
        assert sum(read.values()) == held < 0.6 * whole
        down = config.hidden_size * config.intermediate_size // 2  # half of its columns
        assert read["model.layers.0.mlp.down_proj.weight"] == down
        assert read["visual.patch_embed.proj.weight"] == shard.visual.patch_embed.proj.weight.numel()


def test_vision_calls_are_shared_by_load():
    assert assign_vision_calls([100, 10, 60, 50], 2) == [0, 0, 1, 1]  # loads 110 and 110
    assert assign_vision_calls([5], 4) == [0]


@pytest.fixture(scope="module")
def mixed_inputs(tiny_checkpoint):
    processor = Processor.from_pretrained(tiny_checkpoint)
    return [processor(m) for m in mixed_messages()]


def greedy(inputs, new_tokens=8):
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, logprobs=5)
    return [Request.from_inputs(i, params) for i in inputs]


@pytest.mark.parametrize(
    "config",
    [
        dict(max_batch_tokens=4096, num_kv_blocks=512),
        # chunked prefill; many vision calls, videos split into temporal slices, shared by both ranks
        dict(max_batch_tokens=48, num_kv_blocks=512, max_vision_patches=64),
    ],
    ids=["roomy", "chunked"],
)
def test_two_ranks_give_the_tokens_and_logits_of_one(tiny_checkpoint, mixed_inputs, config, hard_timeout):
    """Images, videos, both, and text only: greedy tokens identical, log-probabilities equal to float32
    round-off (a split matmul sums in another order: not bit for bit)."""
    logits: dict[int, list[torch.Tensor]] = {1: [], 2: []}

    def recording(engine, size):
        forward = engine.runner.forward

        def record(step):
            out = forward(step)
            if out is not None:
                logits[size].append(out.clone())
            return out

        engine.runner.forward = record
        return engine

    alone = Engine.from_pretrained(tiny_checkpoint, EngineConfig(**config))
    one = recording(alone, 1).generate(greedy(mixed_inputs))
    with Engine.from_pretrained(tiny_checkpoint, EngineConfig(**config, tensor_parallel_size=2)) as engine:
        assert engine.runner.k_cache.shape[3] == 1  # this rank's one key/value head of the tiny model's 2
        two = recording(engine, 2).generate(greedy(mixed_inputs))
        vision_patches = engine.runner.vision_patches
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    # The same schedule, step for step: the logits of every sampled row, whole vocabulary.
    assert len(logits[2]) == len(logits[1]) >= 8  # one step a token at least
    for a, b in zip(logits[1], logits[2]):
        assert b.shape == a.shape and b.shape[1] == alone.model_config.vocab_size
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * max(1.0, a.abs().max().item()))
    for a, b in zip(one, two):
        for top_a, top_b in zip(a.logprobs, b.logprobs):
            shared = [t for t in top_a if t in top_b]
            assert len(shared) >= 4
            for t in shared:
                assert top_b[t] == pytest.approx(top_a[t], rel=1e-5, abs=1e-6)
    total = sum(
        int(torch.as_tensor(i[k]).prod(-1).sum())
        for i in mixed_inputs
        for k in ("image_grid_thw", "video_grid_thw")
        if i[k] is not None
    )
    assert 0 < vision_patches < total  # rank 0 encoded only its share of the vision calls


def test_a_killed_rank_fails_the_engine_at_once_and_a_new_one_starts(
    tiny_checkpoint, mixed_inputs, hard_timeout
):
    engine = Engine.from_pretrained(
        tiny_checkpoint, EngineConfig(max_batch_tokens=256, num_kv_blocks=512, tensor_parallel_size=2)
    )
    rank1 = engine.ranks.procs[0]
    threading.Timer(0.5, lambda: rank1.send_signal(signal.SIGKILL)).start()
    started = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank 1 \(pid \d+\) exited with status -9"):
        engine.generate(greedy(mixed_inputs * 4, new_tokens=200))
    assert time.monotonic() - started < 30
    with pytest.raises(RankFailed, match="stopped earlier"):
        engine.generate(greedy(mixed_inputs[:1]))
    with Engine.from_pretrained(tiny_checkpoint, EngineConfig(tensor_parallel_size=2)) as fresh:
        assert len(fresh.generate(greedy(mixed_inputs[:2]))) == 2


def test_a_model_that_does_not_split_is_refused_before_any_rank_starts(tiny_checkpoint):
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not split this model.*use one of"):
        Engine.from_pretrained(tiny_checkpoint, EngineConfig(tensor_parallel_size=3))
    model = Qwen2VL.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match="starts its ranks itself"):
        Engine(model, EngineConfig(tensor_parallel_size=2))


def ocr_rows(job) -> pd.DataFrame:
    df = pd.read_parquet(job.output)
    return df.set_index(["uri", "page_index"]).sort_index()[["status", "text", "generated_tokens"]]


def test_a_job_with_two_ranks_per_worker_writes_the_rows_of_one(
    tmp_path, pipeline_corpus, pipeline_runs, hard_timeout
):
    from pipeline.driver import run_job
    from schemas import validate_job

    spec = pipeline_corpus["ocr"]
    job = validate_job(
        {**spec, "output": str(tmp_path / "tp2"), "resources": {**spec["resources"], "gpus_per_worker": 2}}
    )
    assert job.resources.tensor_parallel_size == 2
    run_job(job, progress=False)
    one, _ = pipeline_runs["ocr"]
    assert (ocr_rows(one).status == "ok").any()
    pd.testing.assert_frame_equal(ocr_rows(job), ocr_rows(one))


def rank_processes() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and RANK_ENTRY.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_a_killed_rank_ends_in_a_restarted_worker_and_every_unit_once(
    tmp_path, pipeline_corpus, ray_local, hard_timeout
):
    """The GPU worker whose rank dies ends itself; Ray restarts it (ranks and all) and its packs are
    redone: every page is written exactly once, none as an error."""
    from media import make_pdf

    from pipeline.driver import run_job
    from schemas import validate_job

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        make_pdf(docs / f"doc{i}.pdf", pages=3)
    spec = pipeline_corpus["ocr"]
    resources = {**spec["resources"], "gpus_per_worker": 2, "max_batch_tokens": 400}
    job = validate_job(
        {
            **spec,
            "inputs": [str(docs)],
            "output": str(tmp_path / "out"),
            "resources": resources,
            "sampling": {"max_new_tokens": 48},
        }
    )
    killed: list[int] = []

    def kill_one_rank():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            pids = rank_processes()
            if pids:
                time.sleep(4)  # loaded and computing
                if pids[0] in rank_processes():
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one_rank, daemon=True)
    killer.start()
    summary = run_job(job, progress=False)
    killer.join()
    assert killed, "no rank process was seen"
    df = pd.read_parquet(job.output)
    assert summary.finished and len(df) == 12 and (df.status == "ok").all(), df[["uri", "status"]]
    assert not df.duplicated(["uri", "page_index"]).any()


def published_job(tmp_path, size: str, **resources):
    """A job on a directory holding only a published config.json: enough for the GPU fit, which reads
    no weights."""
    import shutil

    from schemas import validate_job

    model_dir = tmp_path / f"qwen2-vl-{size}"
    model_dir.mkdir(exist_ok=True)
    shutil.copy(CONFIGS / f"qwen2-vl-{size}-instruct.json", model_dir / "config.json")
    return validate_job(
        {
            "kind": "ocr_documents",
            "model": str(model_dir),
            "inputs": [str(tmp_path)],
            "output": str(tmp_path / "out"),
            "resources": resources,
        }
    )


def test_the_gpu_fit_of_72b_on_h200s(tmp_path):
    from pipeline.budget import gpu_layout

    one = gpu_layout(published_job(tmp_path, "72b", gpus_per_worker=1, gpu_memory_gb=141))
    assert one.weights_bytes == 73_405_560_320 * 2  # bf16: 146.8 GB on one GPU
    assert "does not fit with gpus_per_worker=1 on 141 GB per GPU" in one.problem()
    assert "its weights take 146.8 GB per GPU; set resources.gpus_per_worker to 2" in one.problem()

    two = gpu_layout(published_job(tmp_path, "72b", gpus_per_worker=2, gpu_memory_gb=141))
    assert two.problem() is None and two.weights_bytes == 37_053_117_952 * 2
    # per GPU: 80 layers x 4 of the 8 key/value heads x 128 x K and V x 2 bytes a token
    assert two.kv_bytes_per_token == 80 * 4 * 128 * 2 * 2
    assert 300_000 < two.kv_tokens < 330_000  # 80% of the 64.8 GB the weights and 2 GiB leave
    lines = "\n".join(two.describe())
    assert "weights per GPU              74.1   GB (sharded over 2 GPUs, vision tower on each)" in lines
    assert "tokens per worker, on 141 GB per GPU (resources.gpu_memory_gb)" in lines

    small = gpu_layout(
        published_job(tmp_path, "7b", gpus_per_worker=1, gpu_memory_gb=20, max_step_tokens=256)
    )
    assert "fewer than one sequence of the model's context (32,768)" in small.problem()


def test_plan_and_run_refuse_a_layout_that_cannot_fit(tmp_path, pipeline_corpus, capsys):
    from jobs.cli import main
    from pipeline.driver import run_job
    from schemas import validate_job

    spec = {**pipeline_corpus["ocr"], "device": "auto", "output": str(tmp_path / "out")}
    spec["resources"] = {**spec["resources"], "gpu_memory_gb": 0.001}
    path = tmp_path / "job.yaml"
    path.write_text(__import__("yaml").safe_dump(spec))
    assert main(["plan", str(path)]) == 1
    printed = capsys.readouterr().out
    assert "weights per GPU" in printed and "does not fit:" in printed and "its weights take" in printed
    with pytest.raises(ValueError, match="does not fit with gpus_per_worker=1 on 0 GB per GPU"):
        run_job(validate_job(spec), progress=False)
    assert not (tmp_path / "out").exists()  # refused before any work

    spec["resources"]["gpus_per_worker"] = 3
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not split this model"):
        run_job(validate_job(spec), progress=False)
    spec["resources"]["gpus_per_worker"] = 1.5
    with pytest.raises(ValueError, match="use 1 or 2, or a fraction up to 1"):
        validate_job(spec)
