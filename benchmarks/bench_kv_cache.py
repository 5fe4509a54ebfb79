"""KV cache throughput: appends (one decode step of a batch, and a prefill) into the C++ static and paged
caches against plain PyTorch indexing (the previous pure-PyTorch StaticKVCache), and fork/free and
window-with-sinks eviction of the paged cache. Sizes: SmolLM2-135M's cache (30 layers, 3 KV heads,
head_dim 64, fp32).

    .venv/bin/pytest benchmarks/bench_kv_cache.py --benchmark-enable
"""
from __future__ import annotations

import pytest
import torch

from llama_fast import PagedKVCache, StaticKVCache

LAYERS, HKV, D = 30, 3, 64
BLOCK = 16


def torch_static_step(k_layers, v_layers, seqlens, k, v):
    """The pure-PyTorch write (advanced indexing), per layer."""
    B, T = k.shape[1], k.shape[2]
    pos = seqlens.long()[:, None] + torch.arange(T)[None, :]
    rows = torch.arange(B)[:, None]
    for layer in range(LAYERS):
        k_layers[layer][rows, pos] = k[layer]
        v_layers[layer][rows, pos] = v[layer]


@pytest.mark.parametrize("B,T", [(1, 1), (8, 1), (64, 1), (1, 128)])
@pytest.mark.parametrize("impl", ["static", "paged", "torch"])
def test_append(benchmark, impl, B, T):
    max_len = 2048
    k = torch.randn(LAYERS, B, T, HKV, D)
    v = torch.randn(LAYERS, B, T, HKV, D)
    benchmark.group = f"append B={B} T={T}"
    if impl == "torch":
        ks = [torch.zeros(B, max_len, HKV, D) for _ in range(LAYERS)]
        vs = [torch.zeros(B, max_len, HKV, D) for _ in range(LAYERS)]
        seqlens = torch.zeros(B, dtype=torch.int32)
        benchmark(torch_static_step, ks, vs, seqlens, k, v)
        return
    if impl == "static":
        cache = StaticKVCache(LAYERS, B, max_len, HKV, D)

        def step():
            if int(cache.seqlens.max()) + T > max_len:
                cache.reset()
            cache.append(k, v)
    else:
        cache = PagedKVCache(LAYERS, B * max_len // BLOCK, BLOCK, HKV, D)
        seqs = [cache.add_sequence() for _ in range(B)]

        def step():
            if cache.length(seqs[0]) + T > max_len:
                for s in seqs:
                    cache.free(s)
                seqs[:] = [cache.add_sequence() for _ in range(B)]
            cache.append(seqs, k, v)
    benchmark(step)


@pytest.mark.parametrize("n", [4, 16])
def test_fork_free(benchmark, n):
    """num_return_sequences=n: fork a 512-token prompt n - 1 times, one decode step each, free them."""
    cache = PagedKVCache(LAYERS, 4096, BLOCK, HKV, D)
    prompt = cache.add_sequence()
    cache.append([prompt], torch.randn(LAYERS, 1, 512, HKV, D), torch.randn(LAYERS, 1, 512, HKV, D))
    k1 = torch.randn(LAYERS, n, 1, HKV, D)

    def fork_step_free():
        kids = [cache.fork(prompt) for _ in range(n - 1)]
        cache.append([prompt] + kids, k1, k1)
        for s in kids:
            cache.free(s)
        cache.set_batch([prompt])
        cache.begin_step(0)
        cache.end_step()

    benchmark.group = "fork/free"
    benchmark(fork_step_free)


@pytest.mark.parametrize("sinks", [0, 4])
def test_streaming_eviction(benchmark, sinks):
    """Decode steps of a window-with-sinks stream (window 256): eviction every block, constant memory."""
    cache = PagedKVCache(LAYERS, 64, BLOCK, HKV, D, window=256, sink_tokens=sinks)
    seqs = [cache.add_sequence() for _ in range(2)]
    cache.append(seqs, torch.randn(LAYERS, 2, 300, HKV, D), torch.randn(LAYERS, 2, 300, HKV, D))
    k1 = torch.randn(LAYERS, 2, 1, HKV, D)
    benchmark.group = "streaming eviction"
    benchmark(cache.append, seqs, k1, k1)
    assert cache.num_free_blocks > 0
