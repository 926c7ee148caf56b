"""Qwen2-VL in plain PyTorch.

- the network: config, vision (tower), language (decoder), rope (M-RoPE), attention (how layers attend),
  qwen2vl (the whole model), weights (safetensors loading);
- preprocessing: processor (resize, frame sampling, patches, chat messages -> inputs), tokenizer, chat;
- the serving engine: model.engine (continuous batching, paged KV cache, attention backends, sampling);
- testing: a tiny random checkpoint in the real layout, for the tests and the demo.
"""

from model.config import Qwen2VLConfig, VisionConfig
from model.engine import Engine, EngineConfig, Request, RequestOutput, SamplingParams, generate
from model.processor import Processor
from model.qwen2vl import Qwen2VL

__all__ = [
    "Engine",
    "EngineConfig",
    "Processor",
    "Qwen2VL",
    "Qwen2VLConfig",
    "Request",
    "RequestOutput",
    "SamplingParams",
    "VisionConfig",
    "generate",
]
