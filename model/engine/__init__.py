"""The serving engine: continuous batching over a paged KV cache.

request (what goes in and out) -> sequence (a request's state) -> scheduler + block_manager (who computes
what each step, which cache blocks hold it) -> model_runner (tensors in, logits out, over kv_cache through an
attention backend; cuda_graphs for decode-only steps) -> sampling -> engine (the loop, and `generate`).
"""

from model.engine.engine import Engine, EngineConfig, EngineStats, generate
from model.engine.request import Request, RequestOutput
from model.engine.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "EngineStats", "Request", "RequestOutput", "SamplingParams", "generate"]
