"""The engine's attention backends, one class each behind `PagedAttention`: SDPA (CPU and CUDA), Triton
(its decode kernel, CUDA) and flash-attn (CUDA)."""

from __future__ import annotations

import torch

from model.engine.attention.flash import FlashAttention
from model.engine.attention.paged import PagedAttention
from model.engine.attention.sdpa import SdpaAttention
from model.engine.attention.triton_decode import TritonAttention, kernel_problem

BACKENDS: dict[str, type[PagedAttention]] = {
    "flash": FlashAttention,
    "triton": TritonAttention,
    "sdpa": SdpaAttention,
}


def backend_problem(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why backend `name` cannot run here, or None."""
    if name not in BACKENDS:
        return f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}"
    return BACKENDS[name].problem(device, dtype)


def pick_backend(device: torch.device, dtype: torch.dtype) -> str:
    """flash-attn where it can run (CUDA, half precision, package installed), else the Triton decode kernel
    on CUDA, SDPA everywhere else."""
    if device.type != "cuda":
        return "sdpa"
    return next(name for name in ("flash", "triton", "sdpa") if backend_problem(name, device, dtype) is None)


__all__ = [
    "BACKENDS",
    "FlashAttention",
    "PagedAttention",
    "SdpaAttention",
    "TritonAttention",
    "backend_problem",
    "kernel_problem",
    "pick_backend",
]
