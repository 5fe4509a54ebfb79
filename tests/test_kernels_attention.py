"""Triton span-biased attention (prefill and decode) against the pure-PyTorch reference.

Runs the kernels through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on CPU
tensors in fp32 and fp16; bf16 is covered by the compile check and benchmarks/gpu_suite.sh. Every call
writes into a NaN-poisoned output, and the accuracy bar is FlashAttention's: the kernel's error against
the fp64 reference is at most twice the error of the reference itself run at the kernel's precision.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from llama_fast import ops, reference
from llama_fast.span import SpanBias, alibi_slopes
from llama_fast.kernels import decode_attention, span_attention

da_module = importlib.import_module("llama_fast.kernels.decode_attention")

SPANS = ["none", "alibi", "buckets", "window", "window_sinks", "softcap", "all"]


def make_span(name: str, num_heads: int, gen: torch.Generator) -> SpanBias:
    buckets = torch.randn(num_heads, 32, generator=gen)
    if name == "none":
        return SpanBias()
    if name == "alibi":
        return SpanBias(alibi_slopes=alibi_slopes(num_heads))
    if name == "buckets":
        return SpanBias(bucket_bias=buckets, num_buckets=32, max_distance=64)
    if name == "window":
        return SpanBias(window=37)
    if name == "window_sinks":
        return SpanBias(window=37, sink_tokens=4)
    if name == "softcap":
        return SpanBias(logit_softcap=2.5)
    if name == "all":
        return SpanBias(alibi_slopes=alibi_slopes(num_heads), bucket_bias=buckets, num_buckets=32, max_distance=64,
                        window=45, sink_tokens=3, logit_softcap=2.5)
    raise KeyError(name)


def assert_fp_close(out, ref_fn, inputs, dtype):
    """Kernel error vs fp64 reference <= 2x (reference at `dtype` vs fp64) + a floor at fp32 rounding."""
    assert not torch.isnan(out).any(), "some outputs were never written (NaN poison survived)"
    ref64 = ref_fn(*[x.double() for x in inputs])
    ref_lo = ref_fn(*inputs)  # inputs are already at dtype: the reference computes in fp32, rounds to dtype
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_lo.double() - ref64).abs().max().item()
    floor = 1e-6 * max(1.0, ref64.abs().max().item())  # fp32 summation order differences
    assert err <= 2 * ref_err + floor, f"error {err:.3g} > 2 x reference error {ref_err:.3g} (+{floor:.1g})"


def rand(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen).to(dtype)


# (T, S) pairs from {1, 17, 100, 300}, T <= S; head_dim, GQA ratio and dtype rotate with the case index so
# every value meets every span variant.
SHAPES = [(1, 1), (1, 17), (1, 100), (1, 300), (17, 17), (17, 100), (17, 300), (100, 100), (100, 300), (300, 300)]
PREFILL_CASES = [(span, T, S) for span in SPANS for (T, S) in SHAPES]


@pytest.mark.parametrize("span_name,T,S", PREFILL_CASES)
def test_span_attention_batched(span_name, T, S):
    idx = PREFILL_CASES.index((span_name, T, S))
    gen = torch.Generator().manual_seed(1000 + idx)
    head_dim = (64, 128)[idx % 2]
    group = (1, 3, 4)[idx % 3]
    dtype = (torch.float16, torch.float32)[(idx // 2) % 2]
    Hkv = 1 + (idx // 3) % 2
    H = Hkv * group
    span = make_span(span_name, H, gen)
    B = 2
    q, k, v = rand(gen, B, T, H, head_dim, dtype=dtype), rand(gen, B, S, Hkv, head_dim, dtype=dtype), \
        rand(gen, B, S, Hkv, head_dim, dtype=dtype)
    q_sink = rand(gen, B, T, H, head_dim, dtype=dtype)  # (spans with sinks score sinks past the window with it)
    out = torch.full_like(q, float("nan"))
    span_attention(q, k, v, span, q_sink=q_sink, out=out)
    assert_fp_close(out, lambda q, k, v, qs: reference.span_attention(q, k, v, span, q_sink=qs), (q, k, v, q_sink),
                    dtype)


@pytest.mark.parametrize("span_name", ["none", "window_sinks", "all", "alibi"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_span_attention_varlen(span_name, dtype):
    gen = torch.Generator().manual_seed(7 + SPANS.index(span_name))
    lengths = [17, 1, 300, 100, 0, 5]
    H, Hkv, D = 4, 1, 64 if span_name != "all" else 128
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = rand(gen, total, H, D, dtype=dtype), rand(gen, total, Hkv, D, dtype=dtype), \
        rand(gen, total, Hkv, D, dtype=dtype)
    q_sink = rand(gen, total, H, D, dtype=dtype)
    span = make_span(span_name, H, gen)
    out = torch.full_like(q, float("nan"))
    span_attention(q, k, v, span, cu_seqlens=cu, q_sink=q_sink, out=out)
    assert_fp_close(out, lambda q, k, v, qs: reference.span_attention(q, k, v, span, cu_seqlens=cu, q_sink=qs),
                    (q, k, v, q_sink), dtype)


def test_span_attention_custom_scale_and_strided_inputs():
    """Non-contiguous q/k/v (head-major storage, a sliced last dim) are handled; scale is honoured."""
    gen = torch.Generator().manual_seed(3)
    B, T, H, D = 2, 40, 3, 64
    q = rand(gen, B, H, T, D, dtype=torch.float32).transpose(1, 2)  # (B, T, H, D) view, head-major
    kv = rand(gen, B, T, 1, 2 * D, dtype=torch.float32)
    k, v = kv[..., :D], kv[..., D:]
    wide = rand(gen, B, T, H, D, 2, dtype=torch.float32)[..., 0]  # last-dim stride 2: copied
    span = make_span("all", H, gen)
    for query in (q, wide):
        out = span_attention(query, k, v, span, scale=0.3)
        ref = reference.span_attention(query, k, v, span, scale=0.3)
        assert (out - ref).abs().max() < 1e-5


def test_ops_dispatch_triton_backend_matches_reference():
    gen = torch.Generator().manual_seed(11)
    q, k, v = (rand(gen, 1, 9, 2, 64, dtype=torch.float32) for _ in range(3))
    span = make_span("window_sinks", 2, gen)
    out = ops.span_attention(q, k, v, span, backend="triton")
    assert torch.allclose(out, reference.span_attention(q, k, v, span), atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Decode over a KV cache


def make_cache(gen, B, lengths, S_max, Hkv, D, dtype, page_size):
    """Contiguous (page_size None) or paged cache with a shuffled block table and spare blocks."""
    if page_size is None:
        return rand(gen, B, S_max, Hkv, D, dtype=dtype), rand(gen, B, S_max, Hkv, D, dtype=dtype), None
    per_row = -(-S_max // page_size)
    num_blocks = B * per_row + 5
    k = rand(gen, num_blocks, page_size, Hkv, D, dtype=dtype)
    v = rand(gen, num_blocks, page_size, Hkv, D, dtype=dtype)
    table = torch.randperm(num_blocks, generator=gen)[: B * per_row].reshape(B, per_row).to(torch.int32)
    return k, v, table


# (span, layout, Tq, group, head_dim, num_splits): Tq 1 (decoding), 3 (speculative), 100 (a prompt through
# the cache: the prefill kernel in cache mode); layout None = contiguous, else the page size.
DECODE_CASES = []
for i, span_name in enumerate(SPANS):
    DECODE_CASES += [
        (span_name, None, 1, (1, 3, 4)[i % 3], (64, 128)[i % 2], None),
        (span_name, 16, 3, (3, 4, 1)[i % 3], (128, 64)[i % 2], None),
        (span_name, 32, 1, 4, 64, (1, 3)[i % 2]),
    ]
DECODE_CASES += [(s, layout, 100, 3, 64, None) for s in ("none", "window_sinks", "all") for layout in (None, 16)]
DECODE_CASES += [("all", 32, 2, 1, 80, 5), ("buckets", None, 16, 4, 96, None)]


@pytest.mark.parametrize("span_name,layout,Tq,group,head_dim,num_splits", DECODE_CASES)
def test_decode_attention(span_name, layout, Tq, group, head_dim, num_splits, monkeypatch):
    monkeypatch.setattr(da_module, "POISON_SCRATCH", True)
    idx = DECODE_CASES.index((span_name, layout, Tq, group, head_dim, num_splits))
    gen = torch.Generator().manual_seed(2000 + idx)
    dtype = (torch.float32, torch.float16)[idx % 2]
    B, Hkv, S_max = 3, 2, 300
    H = Hkv * group
    # Tq + 48: under a window the sinks share the window's first key tile (and still lie past the window)
    lengths = torch.tensor([300, Tq + (16, 48)[idx % 2], max(Tq, 100 + idx)], dtype=torch.int32)
    k_cache, v_cache, table = make_cache(gen, B, lengths, S_max, Hkv, head_dim, dtype, layout)
    q, q_sink = rand(gen, B, Tq, H, head_dim, dtype=dtype), rand(gen, B, Tq, H, head_dim, dtype=dtype)
    span = make_span(span_name, H, gen)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k_cache, v_cache, lengths, span, table, q_sink=q_sink, out=out, num_splits=num_splits)
    assert_fp_close(out, lambda q, k, v, qs: reference.decode_attention(q, k, v, lengths, span, table, q_sink=qs),
                    (q, k_cache, v_cache, q_sink), dtype)


def test_decode_matches_span_attention_on_the_same_tokens():
    """Decoding the last token over the cache equals the prefill kernel's last row (same positions)."""
    gen = torch.Generator().manual_seed(5)
    S, H, D = 77, 4, 64
    span = make_span("all", H, gen)
    q = rand(gen, 1, S, H, D, dtype=torch.float32)
    k, v = rand(gen, 1, S, 2, D, dtype=torch.float32), rand(gen, 1, S, 2, D, dtype=torch.float32)
    full = span_attention(q, k, v, span)
    last = decode_attention(q[:, -1:], k, v, torch.tensor([S], dtype=torch.int32), span)
    assert torch.allclose(full[:, -1:], last, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# The window skips work: key blocks loaded per program do not grow with S


def test_window_bounds_key_blocks_loaded_by_prefill():
    gen = torch.Generator().manual_seed(9)
    T, H, D, window, sinks = 64, 1, 64, 64, 4
    span = SpanBias(window=window, sink_tokens=sinks)
    maxima, plain = [], []
    for S in (256, 1024, 4096):
        q = rand(gen, 1, T, H, D, dtype=torch.float32)
        k, v = rand(gen, 1, S, H, D, dtype=torch.float32), rand(gen, 1, S, H, D, dtype=torch.float32)
        counts = torch.empty(0, dtype=torch.int32)
        out = span_attention(q, k, v, span, block_counts=counts)
        assert (counts >= 0).all()
        maxima.append(int(counts.max()))
        assert torch.allclose(out, reference.span_attention(q, k, v, span), atol=1e-5)
        span_attention(q, k, v, SpanBias(), block_counts=counts)
        plain.append(int(counts.max()))
    assert maxima[0] == maxima[1] == maxima[2], maxima
    # without a window the last query block reads every key block: the count grows with S
    assert plain[0] < plain[1] < plain[2], plain
    # and the windowed count is (window + query block) / BLOCK_N plus one sink block
    assert maxima[0] <= (window + T) // 32 + 2


def test_window_bounds_key_blocks_loaded_by_decode():
    gen = torch.Generator().manual_seed(10)
    H, D, window = 4, 64, 100
    span = SpanBias(window=window, sink_tokens=2)
    maxima = []
    for S in (256, 1024, 4096):
        q = rand(gen, 1, 1, H, D, dtype=torch.float32)
        k, v = rand(gen, 1, S, 2, D, dtype=torch.float32), rand(gen, 1, S, 2, D, dtype=torch.float32)
        counts = torch.empty(0, dtype=torch.int32)
        lengths = torch.tensor([S], dtype=torch.int32)
        out = decode_attention(q, k, v, lengths, span, num_splits=1, block_counts=counts)
        maxima.append(int(counts.max()))
        assert torch.allclose(out, reference.decode_attention(q, k, v, lengths, span), atol=1e-5)
    assert maxima[0] == maxima[1] == maxima[2], maxima


# ----------------------------------------------------------------------------------------------------
# Bad input: a clear Python exception


def _qkv(B=1, T=8, H=2, Hkv=1, D=64, S=None, dtype=torch.float32):
    S = T if S is None else S
    return torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, S, Hkv, D, dtype=dtype), \
        torch.randn(B, S, Hkv, D, dtype=dtype)


@pytest.mark.parametrize("case", ["dtype", "kv_shape", "head_dim", "gqa", "s_lt_t", "batch", "dims", "cu_seqlens",
                                  "span_heads", "out", "q_sink"])
def test_span_attention_rejects_bad_input(case):
    q, k, v = _qkv()
    kwargs = {}
    if case == "dtype":
        k = k.half()
    elif case == "kv_shape":
        v = v[:, :4]
    elif case == "head_dim":
        q, k, v = _qkv(D=48)
    elif case == "gqa":
        q, k, v = _qkv(H=3, Hkv=2)
    elif case == "s_lt_t":
        q, k, v = _qkv(T=8, S=4)
    elif case == "batch":
        k, v = k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)
    elif case == "dims":
        q = q[0]
    elif case == "cu_seqlens":
        q, k, v = q[0], k[0], v[0]
        kwargs["cu_seqlens"] = torch.tensor([0, 3, 9], dtype=torch.int32)  # ends past total = 8
    elif case == "span_heads":
        kwargs["span"] = SpanBias(alibi_slopes=alibi_slopes(5))
    elif case == "out":
        kwargs["out"] = torch.empty(1, 8, 2, 32)
    elif case == "q_sink":
        kwargs["q_sink"] = q[:, :4]
    with pytest.raises(ValueError, match="q_sink" if case == "q_sink" else None):
        span_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("case", ["seqlens_beyond_cache", "seqlens_below_tq", "table_outside_pool", "table_negative",
                                  "seqlens_dtype", "cache_stride", "cache_shape", "table_shape", "q_sink"])
def test_decode_attention_rejects_bad_input(case):
    q = torch.randn(2, 1, 4, 64)
    k, v = torch.randn(2, 32, 2, 64), torch.randn(2, 32, 2, 64)
    lengths = torch.tensor([5, 32], dtype=torch.int32)
    table = None
    if case == "seqlens_beyond_cache":
        lengths = torch.tensor([5, 33], dtype=torch.int32)
    elif case == "seqlens_below_tq":
        q = torch.randn(2, 6, 4, 64)
    elif case in ("table_outside_pool", "table_negative", "table_shape"):
        k, v = torch.randn(4, 16, 2, 64), torch.randn(4, 16, 2, 64)
        table = torch.tensor([[0, 1], [2, 4 if case == "table_outside_pool" else -1]], dtype=torch.int32)
        if case == "table_shape":
            table = table[:1]
    elif case == "seqlens_dtype":
        lengths = lengths.long()
    elif case == "cache_stride":
        k = torch.randn(2, 32, 2, 64, 2)[..., 0]
    elif case == "cache_shape":
        v = v[:, :16]
    q_sink = q.half() if case == "q_sink" else None
    with pytest.raises(ValueError, match="q_sink" if case == "q_sink" else None):
        decode_attention(q, k, v, lengths, SpanBias(), table, q_sink=q_sink)


def test_decode_ignores_table_entries_past_the_sequence():
    """Unused block_table slots (beyond cache_seqlens) may hold anything, as in vLLM (-1 padding)."""
    q = torch.randn(1, 1, 2, 64)
    k, v = torch.randn(3, 16, 1, 64), torch.randn(3, 16, 1, 64)
    table = torch.tensor([[2, -1, 99]], dtype=torch.int32)
    lengths = torch.tensor([10], dtype=torch.int32)
    out = decode_attention(q, k, v, lengths, SpanBias(), table)
    ref = reference.decode_attention(q, k, v, lengths, SpanBias(), table[:, :1])
    assert torch.allclose(out, ref, atol=1e-5)
