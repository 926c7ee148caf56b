"""The engine's attention backends, one class each behind `PagedAttention`: SDPA (CPU and CUDA), Triton
(its decode kernel, CUDA) and flash-attn (CUDA)."""

from __future__ import annotations

import warnings

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


def pick_backend(device: torch.device, dtype: torch.dtype, wanted: str | None = None) -> str:
    """`wanted` if it can run here (else a ValueError says why); by default flash-attn where it can run (CUDA,
    half precision, package installed), else the Triton decode kernel on CUDA once it passes its check
    against a reference, SDPA everywhere else."""
    if wanted is not None:
        problem = backend_problem(wanted, device, dtype)
        if problem:
            raise ValueError(f"EngineConfig.attention_backend={wanted!r}: {problem}")
        return wanted
    if device.type != "cuda":
        return "sdpa"
    backend = next(n for n in ("flash", "triton", "sdpa") if backend_problem(n, device, dtype) is None)
    if backend == "triton":
        problem = kernel_problem(device, dtype)
        if problem:
            warnings.warn(f"the Triton decode kernel failed its check ({problem}); using SDPA", stacklevel=3)
            return "sdpa"
    return backend


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
