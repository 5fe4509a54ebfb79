"""The one place that decides which implementation runs an op.

Backends: "reference" (pure PyTorch, llama_fast/reference.py), "triton" (kernels/, CUDA tensors or the
Triton interpreter), "cpu" (the C++ extension). The choice is explicit: a `backend=` argument, else the
LLAMA_FAST_BACKEND environment variable, else by device (CUDA -> triton, CPU -> cpu where the op has a
C++ version and the extension is built, else reference). Each op's choice is logged once. A forced
backend that cannot run the inputs raises; nothing falls back silently.
"""
from __future__ import annotations

import functools
import logging
import os

import torch

from . import reference
from ._ext import ext, has_ext
from .span import SpanBias

log = logging.getLogger("llama_fast")

BACKENDS = ("reference", "triton", "cpu")


class BackendError(RuntimeError):
    """The requested backend cannot run these inputs."""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _log_choice(op: str, backend: str, device: str) -> None:
    log.info("llama_fast: %s on %s uses the %s backend", op, device, backend)


def choose_backend(op: str, device: torch.device, backend: str | None, *, cpu_ext: bool = False) -> str:
    """Resolves the backend for one call of `op` on tensors living on `device`.

    cpu_ext: whether this op has a C++ CPU implementation.
    """
    backend = backend or os.environ.get("LLAMA_FAST_BACKEND") or None
    if backend is None:
        if device.type == "cuda":
            backend = "triton"
        elif cpu_ext and has_ext():
            backend = "cpu"
        else:
            backend = "reference"
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        raise BackendError(
            f"{op}: backend 'triton' needs CUDA tensors (got {device.type}); "
            "set TRITON_INTERPRET=1 before importing Triton to run kernels on CPU tensors"
        )
    if backend == "cpu":
        if device.type != "cpu":
            raise BackendError(f"{op}: backend 'cpu' needs CPU tensors, got {device.type}")
        if not cpu_ext:
            raise BackendError(f"{op} has no C++ CPU implementation; use backend 'reference'")
        ext()  # raises a clear error if the extension is not built
    _log_choice(op, backend, device.type)
    return backend


def _kernels():
    from . import kernels  # imports Triton: only when a Triton backend is really used

    return kernels


def span_attention(q, k, v, span: SpanBias = SpanBias(), scale: float | None = None, cu_seqlens=None, *, backend=None):
    """Span-biased causal attention for prefill (see reference.span_attention for shapes)."""
    which = choose_backend("span_attention", q.device, backend)
    if which == "triton":
        return _kernels().span_attention(q, k, v, span, scale, cu_seqlens)
    return reference.span_attention(q, k, v, span, scale, cu_seqlens)


def decode_attention(q, k_cache, v_cache, cache_seqlens, span: SpanBias = SpanBias(), block_table=None, scale=None, *, backend=None):
    """Attention of new queries over a contiguous or paged KV cache (see reference.decode_attention)."""
    which = choose_backend("decode_attention", q.device, backend)
    if which == "triton":
        return _kernels().decode_attention(q, k_cache, v_cache, cache_seqlens, span, block_table, scale)
    return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, span, block_table, scale)


def rms_norm(x, weight, eps: float, residual=None, *, backend=None):
    which = choose_backend("rms_norm", x.device, backend)
    if which == "triton":
        return _kernels().rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


def apply_rope(q, k, positions, cos_sin_cache, *, backend=None):
    which = choose_backend("apply_rope", q.device, backend)
    if which == "triton":
        return _kernels().apply_rope(q, k, positions, cos_sin_cache)
    return reference.apply_rope(q, k, positions, cos_sin_cache)


def swiglu(gate, up, *, backend=None):
    which = choose_backend("swiglu", gate.device, backend)
    if which == "triton":
        return _kernels().swiglu(gate, up)
    return reference.swiglu(gate, up)


def sample(logits, params, *, step=0, seen=None, backend=None):
    """logits (B, V) -> token ids (B,); params: one SamplingParams or one per row. Pure: see DESIGN 3b."""
    if not isinstance(params, (list, tuple)):
        params = [params] * logits.shape[0]
    if len(params) != logits.shape[0]:
        raise ValueError(f"sample: {len(params)} SamplingParams for {logits.shape[0]} rows")
    which = choose_backend("sample", logits.device, backend)
    return reference.sample(logits, list(params), step=step, seen=seen)
