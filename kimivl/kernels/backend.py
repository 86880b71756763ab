"""The one place a kernel backend is chosen, per call, from the tensors, the environment and what is installed.

Backends: "torch" (plain PyTorch: the references and the fast CPU paths) and "triton" (the Triton kernels for routing,
expert GEMMs and MLA decode attention). `KIMIVL_BACKEND=torch|triton` forces one; otherwise "triton" is used for CUDA
tensors when triton imports and no gradient is needed (the Triton kernels are forward-only), "torch" everywhere else.
Attention uses flash-attn for CUDA half-precision tensors when it is installed, unless KIMIVL_BACKEND=torch. On CPU
tensors "triton" runs only in the Triton interpreter (`TRITON_INTERPRET=1`, set before the kernels are imported): a
correctness tool, not a fast path.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..errors import KimiVLError

BACKENDS = ("torch", "triton")
ENV = "KIMIVL_BACKEND"


class BackendError(KimiVLError, RuntimeError):
    """A forced backend cannot run these tensors (not installed, no GPU and no interpreter, gradients needed)."""


@functools.cache
def has_module(name: str) -> bool:
    """`name` is importable (checked once, without importing it)."""
    return importlib.util.find_spec(name) is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def forced_backend() -> str:
    """The backend KIMIVL_BACKEND forces, or "" when it is unset."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced and forced not in BACKENDS:
        raise BackendError(f"{ENV}={forced!r} is not a backend; choose one of {', '.join(BACKENDS)} (or unset it)")
    return forced


def backend_for(*tensors: torch.Tensor) -> str:
    """'torch' or 'triton' for a Triton-backed op (routing, expert GEMMs, MLA decode: forward-only kernels) on
    `tensors` (the first one's device decides)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    forced = forced_backend()
    if not forced:
        return "triton" if tensors[0].is_cuda and not needs_grad and has_module("triton") else "torch"
    if forced == "triton":
        if not has_module("triton"):
            raise BackendError(f"{ENV}=triton but triton is not installed: `pip install .[cuda]` (or unset {ENV})")
        if needs_grad:
            raise BackendError(f"{ENV}=triton: the Triton kernels are forward-only; run under torch.no_grad() "
                               f"or use {ENV}=torch for training")
        if not tensors[0].is_cuda and not triton_interpreting():
            raise BackendError(f"{ENV}=triton on {tensors[0].device} tensors needs the Triton interpreter: set "
                               "TRITON_INTERPRET=1 before kimivl's Triton kernels are imported, or use CUDA tensors")
    return forced


def flash_attn_usable(q: torch.Tensor) -> bool:
    """flash-attn serves q (and k, v alike): CUDA, fp16/bf16, installed, not forced off. It has a backward pass and
    needs no triton."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and forced_backend() != "torch"
            and has_module("flash_attn"))


def tl_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for float32 operands: TF32 only when torch itself allows it for matmuls."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"
