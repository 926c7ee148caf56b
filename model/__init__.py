"""Qwen2-VL in plain PyTorch."""

from model.config import Qwen2VLConfig, VisionConfig
from model.generate import generate, sample_next
from model.processor import Processor
from model.qwen2vl import Qwen2VL

__all__ = ["Processor", "Qwen2VL", "Qwen2VLConfig", "VisionConfig", "generate", "sample_next"]

# Engine (issue #4): import its names here and extend __all__.
from model.engine import Engine, EngineConfig, Request, RequestOutput  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402

__all__ += ["Engine", "EngineConfig", "Request", "RequestOutput", "SamplingParams"]
