"""Decode steps on CUDA replayed from CUDA graphs (the gpt-fast recipe: a static cache, then one launch
per token instead of ~400 kernel launches, each paying Python and launch overhead).

A graph bakes in the addresses of every tensor it touches, so the path owns its KV caches: one
GraphStaticKVCache per (batch size, capacity bucket), reset and reused by every generation that fits
it. A graph is captured the first time a (batch size, bucket) steps and replayed after that; the
captured step is the model's own forward (Triton kernels), run through a cache whose step protocol
never reads the device.

    graphs = CudaGraphDecodePath(model)
    cache = graphs.new_cache(batch_size, max_len)   # prefill into it with model(...), as usual
    logits = graphs.step(next_tokens, cache)         # (B,) -> (B, vocab) fp32, valid until the next step
"""
from __future__ import annotations

import torch

from .cache import GraphStaticKVCache, check_room


def cache_bucket(max_len: int, smallest: int = 256) -> int:
    """Capacity of the cache that serves rows of up to max_len tokens: the next power of two (>= smallest),
    so a handful of graphs cover every length."""
    bucket = smallest
    while bucket < max_len:
        bucket *= 2
    return bucket


class CudaGraphDecodePath:
    """One-token decode steps of `model` (on CUDA) replayed from CUDA graphs; see the module docstring."""

    def __init__(self, model, *, warmup_steps: int = 2):
        if model.device.type != "cuda":
            raise ValueError("CudaGraphDecodePath needs a model on a CUDA device")
        self.model, self.warmup_steps = model, warmup_steps
        self._caches: dict[tuple[int, int], GraphStaticKVCache] = {}
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.captures = 0  # graphs captured so far (each (batch size, bucket) once)

    def new_cache(self, batch_size: int, max_len: int) -> GraphStaticKVCache:
        """An empty cache for batch_size rows of up to max_len tokens (the same object for every call
        with the same batch size and bucket: the graphs captured on it stay valid)."""
        c = self.model.config
        key = (batch_size, min(cache_bucket(max_len), max(max_len, c.max_seq_len)))
        cache = self._caches.get(key)
        if cache is None:
            cache = GraphStaticKVCache(c.n_layers, batch_size, key[1], c.n_kv_heads, c.head_dim,
                                       dtype=self.model.dtype, device=self.model.device)
            self._caches[key] = cache
        cache.reset()
        return cache

    def applies_to(self, cache) -> bool:
        return any(cache is mine for mine in self._caches.values())

    def step(self, tokens: torch.Tensor, cache: GraphStaticKVCache) -> torch.Tensor:
        """tokens (B,) int64 -> logits (B, vocab) fp32; the new K/V go into the cache, which advances by
        one token per row. The logits tensor is the graph's output buffer: read it before the next step."""
        if not self.applies_to(cache):
            raise ValueError("CudaGraphDecodePath.step needs a cache from its own new_cache()")
        check_room(max(cache.host_lengths) + 1, cache.max_seq_len)
        key = (cache.batch_size, cache.max_seq_len)
        if key not in self._graphs:
            self._graphs[key] = self._capture(cache)
        graph, tokens_in, logits_out = self._graphs[key]
        tokens_in.copy_(tokens.reshape(-1, 1), non_blocking=True)
        graph.replay()
        cache.advance_host(1)
        return logits_out

    def _capture(self, cache: GraphStaticKVCache):
        """Warms the step up on a side stream (Triton compiles, allocator pools fill), then captures it.
        Neither leaves a trace in the cache: the lengths are restored (the K/V written past them are
        overwritten by the real steps)."""
        saved, saved_host = cache.seqlens.clone(), cache.lengths()
        tokens_in = torch.zeros(cache.batch_size, 1, dtype=torch.int64, device=cache.seqlens.device)

        def restore():
            cache.seqlens.copy_(saved)
            cache.host_lengths = list(saved_host)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_steps):
                self.model(tokens_in, cache)
                restore()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits_out = self.model(tokens_in, cache)[:, -1]  # (B, vocab)
        restore()  # capturing ran the Python side of end_step (host lengths), not the kernels
        self.captures += 1
        return graph, tokens_in, logits_out
