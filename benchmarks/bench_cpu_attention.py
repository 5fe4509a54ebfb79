"""CPU attention over a KV cache: the C++ op (ops.decode_attention, backend "cpu": the decode step's kernel)
against torch's SDPA (plain causal only: it has no span bias) and the pure-PyTorch reference, on
SmolLM2-135M's shape (9 query heads over 3 KV heads, head_dim 64), fp32 and bf16 caches.

    .venv/bin/pytest benchmarks/bench_cpu_attention.py --benchmark-enable   # pytest-benchmark's table
    .venv/bin/python benchmarks/bench_cpu_attention.py [--json out.json]    # a markdown table of ratios

Cases: one new query over 128, 1024 and 4096 cached keys (a decode step's attention, one layer), and a
128-token prompt attending to itself (a prefill's). Times are per layer, medians, torch's thread count.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bench_sampling import median_ms  # (benchmarks/ is on sys.path for its scripts and under pytest)

from llama_fast import ops, reference
from llama_fast.span import SpanBias

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
CASES = ((1, 128), (1, 1024), (1, 4096), (128, 128))  # (new queries T, keys in the cache S)
CACHE_DTYPES = (torch.float32, torch.bfloat16)


def make_inputs(T: int, S: int, cache_dtype: torch.dtype):
    g = torch.Generator().manual_seed(T * S)
    q = torch.randn(1, T, HEADS, HEAD_DIM, generator=g)
    k, v = (torch.randn(1, S, KV_HEADS, HEAD_DIM, generator=g).to(cache_dtype) for _ in range(2))
    return q, k, v, torch.tensor([S], dtype=torch.int32)


def sdpa(q, k, v):
    """torch's fused attention, causal, the new queries at the end of the cache; GQA by repeating K/V."""
    T, S = q.shape[1], k.shape[1]
    group = HEADS // KV_HEADS
    kk, vv = (x.float().repeat_interleave(group, dim=2).transpose(1, 2) for x in (k, v))
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    return F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, attn_mask=mask).transpose(1, 2)


def runner(impl: str, T: int, S: int, cache_dtype: torch.dtype):
    q, k, v, seqlens = make_inputs(T, S, cache_dtype)
    if impl == "cpp":
        return lambda: ops.decode_attention(q, k, v, seqlens, SpanBias(), backend="cpu")
    if impl == "sdpa":
        return lambda: sdpa(q, k, v)
    return lambda: reference.decode_attention(q, k, v, seqlens, SpanBias())


IMPLS = ("cpp", "sdpa", "reference")


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES, ids=str)
@pytest.mark.parametrize("T,S", CASES)
@pytest.mark.parametrize("impl", IMPLS)
def test_attention(benchmark, impl, T, S, cache_dtype):
    benchmark.group = f"attention T={T} S={S} {cache_dtype}"
    benchmark.pedantic(runner(impl, T, S, cache_dtype), rounds=20, iterations=1, warmup_rounds=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    # The C++ op must agree with the reference before it is timed.
    for T, S in CASES:
        for dt in CACHE_DTYPES:
            q, k, v, seqlens = make_inputs(T, S, dt)
            torch.testing.assert_close(ops.decode_attention(q, k, v, seqlens, SpanBias(), backend="cpu"),
                                       reference.decode_attention(q, k, v, seqlens, SpanBias()), rtol=1e-4, atol=1e-4)
    rows = []
    print(f"torch threads: {torch.get_num_threads()}; heads {HEADS} over {KV_HEADS} KV heads, head_dim {HEAD_DIM}")
    print("| T | S | cache | C++ ms | SDPA ms | reference ms | vs SDPA | vs reference |")
    print("|---|---|---|---|---|---|---|---|")
    for T, S in CASES:
        for dt in CACHE_DTYPES:
            t = {impl: median_ms(runner(impl, T, S, dt), max_rounds=200) for impl in IMPLS}
            rows.append({"T": T, "S": S, "cache": str(dt), **t})
            print(f"| {T} | {S} | {str(dt).replace('torch.', '')} | {t['cpp']:.3f} | {t['sdpa']:.3f} | "
                  f"{t['reference']:.3f} | {t['sdpa'] / t['cpp']:.2f}x | {t['reference'] / t['cpp']:.1f}x |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
