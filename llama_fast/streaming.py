"""Streaming past the context window with attention sinks (StreamingLLM, Xiao et al. 2023).

With SpanBias(window=W, sink_tokens=S), a key that falls W or more positions behind the newest query is
invisible to every later query, unless it is one of the first S (the sinks). StreamingKVCache drops
those keys and keeps the memory constant: it wraps a contiguous cache of S + W + slack slots per row
and, when a row would overflow, moves its newest W - 1 tokens down to sit right after the sinks.

Nothing is re-rotated: keys stay rotated at their true positions, and begin_step hands out true positions
(cache index + the row's evicted count past the sinks). Attention reads the cache by index, which gives
every window key its true distance (the shift cancels); the sinks are scored from sink_position(t) with the
query rotated there (docs/ARCHITECTURE.md section 3), and once a row has evicted, every query it runs lies
at index >= S + W - 1, where sink_position of its index and of its true position agree. So the numbers
are the C++ session's, whichever cache a row streams through and whenever it evicts.
"""
from __future__ import annotations

import torch

from .span import SpanBias


class StreamingKVCache:
    """A cache that never fills: S sinks + a sliding window of W tokens per row (plus `slack` spare slots).

    Speaks the cache step protocol (see cache.py); `base` is a contiguous cache (StaticKVCache) whose
    max_seq_len must be sink_tokens + window + slack.
    """

    def __init__(self, base, span: SpanBias, slack: int):
        if span.window is None:
            raise ValueError("StreamingKVCache needs a SpanBias with a window")
        if base.max_seq_len != span.sink_tokens + span.window + slack or slack < 1:
            raise ValueError("StreamingKVCache: base.max_seq_len must be sink_tokens + window + slack, slack >= 1")
        self.base, self.span, self.slack = base, span, slack
        self.evicted = [0] * base.batch_size  # per row: tokens dropped so far (true position - index past the sinks)
        self._offsets = torch.zeros(base.batch_size, 1, dtype=torch.int64, device=base.seqlens.device)

    k = property(lambda self: self.base.k)
    v = property(lambda self: self.base.v)
    block_table = property(lambda self: self.base.block_table)
    seqlens = property(lambda self: self.base.seqlens)
    step_seqlens = property(lambda self: self.base.step_seqlens)
    max_seq_len = property(lambda self: self.base.max_seq_len)

    @property
    def position_bound(self) -> int:
        return self.base.max_seq_len + max(self.evicted)

    @property
    def tokens_held(self) -> int:
        """KV entries held over all rows: constant once the window has filled."""
        return int(self.base.seqlens.sum())

    def begin_step(self, num_new: int) -> torch.Tensor:
        """Evicts from every row that could not take num_new more tokens; returns the new tokens' true
        positions (B, T)."""
        if num_new > self.slack:
            raise ValueError(f"StreamingKVCache takes at most slack={self.slack} tokens per step, got {num_new}")
        for row, length in enumerate(self.base.seqlens.tolist()):
            if length + num_new > self.base.max_seq_len:
                self._evict(row, length)
        return self.base.begin_step(num_new) + self._offsets

    def _evict(self, row: int, length: int) -> None:
        """Moves the newest window - 1 tokens of `row` down behind the sinks; the ones in between go."""
        sinks, keep = self.span.sink_tokens, self.span.window - 1
        for layer in range(len(self.base.k)):
            for pool in (self.base.k[layer][row], self.base.v[layer][row]):  # (S_max, Hkv, D)
                pool[sinks:sinks + keep] = pool[length - keep:length].clone()
        self.base.seqlens[row] = sinks + keep
        self.evicted[row] += length - keep - sinks
        self._offsets[row] = self.evicted[row]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.base.write(layer, k, v)

    def end_step(self, num_kept=None) -> None:
        self.base.end_step(num_kept)
