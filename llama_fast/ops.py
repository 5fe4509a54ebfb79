"""The one place that decides which implementation runs an op.

Backends: "reference" (pure PyTorch, llama_fast/reference.py), "triton" (kernels/, CUDA tensors or the
Triton interpreter), "cpu" (the C++ extension). The choice is explicit: a `backend=` argument, else the
LLAMA_FAST_BACKEND environment variable, else by device (CUDA -> triton, CPU -> cpu where the op has a
C++ version and the extension is built, else reference). Each op's choice is logged once. A forced
backend that cannot run the inputs raises; nothing falls back silently.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import secrets

import torch

from . import reference
from ._ext import ext, has_ext
from .sampling import SamplingParams
from .span import SpanBias, derived_table

log = logging.getLogger("llama_fast")

BACKENDS = ("reference", "triton", "cpu")


class BackendError(RuntimeError):
    """The requested backend cannot run these inputs."""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _log_choice(op: str, backend: str, device: str) -> None:
    log.info("llama_fast: %s on %s uses the %s backend", op, device, backend)


def choose_backend(op: str, device: torch.device, backend: str | None, *, cpu_ext: bool | str = False) -> str:
    """Resolves the backend for one call of `op` on tensors living on `device`.

    cpu_ext: whether this op has a C++ CPU implementation (True), or why it cannot run these inputs (a str).
    """
    backend = backend or os.environ.get("LLAMA_FAST_BACKEND") or None
    if backend is None:
        if device.type == "cuda":
            backend = "triton"
        elif cpu_ext is True and has_ext():
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
        if cpu_ext is not True:
            why = f" for these inputs ({cpu_ext})" if cpu_ext else ""
            raise BackendError(f"{op} has no C++ CPU implementation{why}; use backend 'reference'")
        ext()  # raises a clear error if the extension is not built
    _log_choice(op, backend, device.type)
    return backend


def _kernels():
    from . import kernels  # imports Triton: only when a Triton backend is really used

    return kernels


def span_attention(q, k, v, span: SpanBias = SpanBias(), scale: float | None = None, cu_seqlens=None, q_sink=None, *,
                   backend=None):
    """Span-biased causal attention for prefill (see reference.span_attention for shapes and q_sink)."""
    which = choose_backend("span_attention", q.device, backend)
    if which == "triton":
        return _kernels().span_attention(q, k, v, span, scale, cu_seqlens, q_sink=q_sink)
    return reference.span_attention(q, k, v, span, scale, cu_seqlens, q_sink)


def _cpu_attention_unsupported(k_cache, block_table) -> str | None:
    if block_table is not None and not block_table.is_contiguous():
        return "a non-contiguous block table"
    if k_cache.dtype not in (torch.float32, torch.bfloat16):
        return f"a {k_cache.dtype} cache"
    return None


def cpu_bucket_table(span: SpanBias) -> torch.Tensor | None:
    """reference.bucket_table(span) for the C++ attention, built once per span (not per layer and step)."""
    if span.bucket_bias is None:
        return None
    return derived_table(span, "cpu_table", "cpu", lambda: reference.bucket_table(span))


def decode_attention(q, k_cache, v_cache, cache_seqlens, span: SpanBias = SpanBias(), block_table=None, scale=None,
                     q_sink=None, *, backend=None):
    """Attention of new queries over a contiguous or paged KV cache (see reference.decode_attention).

    On CPU the C++ version (the session's attention, one query at a time) runs contiguous and paged fp32/bf16
    caches: a prompt's attention without the (H, T, S) score and bias tensors of the reference.
    """
    unsupported = _cpu_attention_unsupported(k_cache, block_table) if q.device.type == "cpu" else "not on the CPU"
    which = choose_backend("decode_attention", q.device, backend, cpu_ext=unsupported or True)
    if which == "triton":
        return _kernels().decode_attention(q, k_cache, v_cache, cache_seqlens, span, block_table, scale, q_sink=q_sink)
    if which == "cpu":
        out = ext().cpu_attention(
            q.float().contiguous(), k_cache, v_cache, cache_seqlens,
            alibi_slopes=span.alibi_slopes, bucket_table=cpu_bucket_table(span), window=span.window or 0,
            sink_tokens=span.sink_tokens, logit_softcap=span.logit_softcap or 0.0,
            scale=q.shape[-1] ** -0.5 if scale is None else scale,
            q_sink=None if q_sink is None else q_sink.float().contiguous(), block_table=block_table)
        return out.to(q.dtype)
    return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, span, block_table, scale, q_sink)


# Up to this many rows the C++ kernels (each weight row read once for up to 8 (AVX-512) / 4 vectors, register
# blocks over L2 tiles of rows beyond) go to them for fp32 weights in the PyTorch forward on CPU (the eager
# reference route; generation runs on the session, which always uses them). Measured with the kernels before
# they became batch-invariant (2-core AVX2 Zen 3, (1536, 576) weights, GFLOPS C++ / torch: 32 rows 123.8 /
# 88.0, 64 rows 140.2 / 118.8, 128 rows 134.5 / 133.0); `benchmarks/bench_decode_step.py --matvec` re-measures.
CPU_MATVEC_MAX_ROWS = 64


def linear(x, weight, *, backend=None):
    """x (..., K) @ weight (N, K).T -> (..., N) in x's dtype (no bias: LLaMA has none).

    The "cpu" backend: the C++ matrix-vector kernels (fp32 products and sums) take fp32 weights for up to
    CPU_MATVEC_MAX_ROWS rows (a decode step through the model, a short prompt, a paged batch) and bf16
    weights for any number: torch's bf16 GEMM on CPUs without native bf16 ran 8x slower than its fp32
    one (128 rows: 14.6 ms against 1.8), the C++ kernels 3.2 ms, without the fp32 copy of the weights and
    the MKL buffers (~6 MiB) that going through the fp32 GEMM would cost. Every other backend (reference;
    triton, which has no GEMM kernel here) is torch's own F.linear. A packed matrix (llama_fast.quant: a
    GGUF block format, CUDA's int8 / int4) always goes to its own kernels.
    """
    if not isinstance(weight, torch.Tensor):  # a packed matrix (llama_fast.quant): it multiplies itself
        return weight.linear(x)
    supported = x.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous()
    which = choose_backend("linear", x.device, backend,
                           cpu_ext=True if supported else "not a contiguous fp32/bf16 weight on the CPU")
    rows = math.prod(x.shape[:-1])
    if which != "cpu" or rows == 0 or (weight.dtype == torch.float32 and rows > CPU_MATVEC_MAX_ROWS):
        return torch.nn.functional.linear(x, weight)
    out = ext().cpu_matvec(weight, x.reshape(rows, -1).float().contiguous())
    return out.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def _cpu_fp32(*tensors) -> bool | str:
    """True when the C++ elementwise ops can run these tensors, else why not."""
    if all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return True
    return "they run contiguous float32 CPU tensors"


def rms_norm(x, weight, eps: float, residual=None, *, backend=None):
    """See reference.rms_norm. On CPU (fp32) one C++ pass per row instead of six torch ops."""
    which = choose_backend("rms_norm", x.device, backend,
                           cpu_ext=_cpu_fp32(x, weight, *([] if residual is None else [residual])))
    if which == "triton":
        return _kernels().rms_norm(x, weight, eps, residual)
    if which == "cpu":
        out, total = ext().cpu_rms_norm(x, weight, eps, residual)
        return (out, total) if residual is not None else out
    return reference.rms_norm(x, weight, eps, residual)


def apply_rope(q, k, positions, cos_sin_cache, *, backend=None):
    """See reference.apply_rope (in place, returns q and k)."""
    which = choose_backend("apply_rope", q.device, backend, cpu_ext=_cpu_fp32(q, k, cos_sin_cache))
    if which == "triton":
        return _kernels().apply_rope(q, k, positions, cos_sin_cache)
    if which == "cpu":
        ext().cpu_rope(q, k, positions, cos_sin_cache)
        return q, k
    return reference.apply_rope(q, k, positions, cos_sin_cache)


def swiglu(gate, up, *, backend=None):
    which = choose_backend("swiglu", gate.device, backend, cpu_ext=_cpu_fp32(gate, up))
    if which == "triton":
        return _kernels().swiglu(gate, up)
    if which == "cpu":
        return ext().cpu_swiglu(gate, up)
    return reference.swiglu(gate, up)


def fresh_seed() -> int:
    """A fresh random seed in [0, 2**63) for a row whose SamplingParams.seed is None."""
    return secrets.randbits(63)


def _params_table(params: list) -> torch.Tensor:
    """(B, 7) fp64 rows [temperature, top_k, top_p, min_p, repetition, presence, frequency] for _C.sample."""
    return torch.tensor(
        [[p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty]
         for p in params],
        dtype=torch.float64,
    ).reshape(len(params), 7)


def sample(logits, params, *, step=0, seen=None, logprobs: bool = False, backend=None):
    """logits (B, V) fp32/fp16/bf16 -> token ids (B,) int64; params: one SamplingParams or one per row.

    Pure (docs/ARCHITECTURE.md section 3b): row b's token depends only on its logits, params, seen counts and step, whatever
    else is in the batch. step: an int or (B,) ints, each row's draw counter. seen: (B, V) int counts of
    the tokens so far (prompt + generated) for the penalties, or None. A row whose seed is None draws from
    a fresh random seed. logprobs=True returns (tokens, logprobs (B,) fp32): log_softmax of the raw
    logits at the chosen tokens. NaN or inf in a row's logits raises ValueError naming the rows.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"sample: logits must be a (B, V) tensor, got {getattr(logits, 'shape', type(logits))}")
    B = logits.shape[0]
    if not isinstance(params, (list, tuple)):
        params = [params] * B
    if len(params) != B:
        raise ValueError(f"sample: {len(params)} SamplingParams for {B} rows")
    for p in params:
        if not isinstance(p, SamplingParams):
            raise TypeError(f"sample: params must be SamplingParams, got {type(p).__name__}")
    params = [p if p.seed is not None or p.greedy else dataclasses.replace(p, seed=fresh_seed()) for p in params]
    if isinstance(step, int):
        steps = [step] * B
    else:
        steps = [int(s) for s in (step.tolist() if isinstance(step, torch.Tensor) else step)]
        if len(steps) != B:
            raise ValueError(f"sample: {len(steps)} steps for {B} rows")
    if any(s < 0 for s in steps):
        raise ValueError(f"sample: steps must be >= 0, got {steps}")
    if seen is not None:
        if not isinstance(seen, torch.Tensor) or tuple(seen.shape) != tuple(logits.shape):
            raise ValueError(f"sample: seen must be a (B, V) = {tuple(logits.shape)} tensor of counts")
    which = choose_backend("sample", logits.device, backend, cpu_ext=True)
    # Sampling has no Triton kernel: "triton" means the extension where it can run these logits.
    use_ext = which == "cpu" or (which == "triton" and has_ext() and (logits.device.type == "cpu" or ext().with_cuda))
    if use_ext:
        if seen is not None and (seen.dtype not in (torch.int32, torch.int64) or seen.device != logits.device):
            seen = seen.to(logits.device, torch.int32 if seen.dtype not in (torch.int32, torch.int64) else seen.dtype)
        seeds = torch.tensor([p.seed or 0 for p in params], dtype=torch.int64)
        tokens, lp = ext().sample(logits, _params_table(params), seeds, torch.tensor(steps, dtype=torch.int64),
                                  seen, logprobs)
        return (tokens, lp) if logprobs else tokens
    tokens = reference.sample(logits, [p if p.seed is not None else dataclasses.replace(p, seed=0) for p in params],
                              step=steps, seen=seen)
    if logprobs:
        lp = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens.to(logits.device)[:, None])[:, 0].cpu()
        return tokens, lp
    return tokens
