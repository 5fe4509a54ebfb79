"""Streaming past the context window with attention sinks (StreamingLLM, Xiao et al. 2023).

With SpanBias(window=W, sink_tokens=S), a key that falls W or more positions behind the newest query is
invisible to every later query, unless it is one of the first S (the sinks). StreamingKVCache drops
those keys and keeps the memory constant: it wraps a contiguous cache of S + W + slack slots per row
and, when a row would overflow, moves its newest W - 1 tokens down to sit right after the sinks.

Positions are positions in the cache (docs/ARCHITECTURE.md section 3): after the move the survivors are
re-indexed, so their keys, stored already rotated by RoPE, are re-rotated by the shift. Why re-rotate
on eviction rather than cache keys unrotated and rotate them at every attention step: a key is moved
about W / slack times in its life (8 times for W=512, slack=64) instead of being rotated at every one of
the W steps it is attended, and every attention backend (Triton, C++, reference) reads the cache as it
is, with no rotation of its own. The price is that the sinks sit between W and W + slack positions
behind the newest query rather than exactly W (RoPE only sees differences of positions); the slack
amortises the move, and tests/test_streaming.py measures that quality holds. Measured on the embedded
model (W=512, slack 128, 2-core CPU): one eviction (move and re-rotate 511 keys in 30 layers) takes
10.3 ms, 0.08 ms per generated token, against a ~45 ms decode step; rotating every cached key at every
step instead would cost about that 10 ms per step.
"""
from __future__ import annotations

import torch

from .span import SpanBias


def rotate_keys_back(k: torch.Tensor, shift: int, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Keys rotated by RoPE at position p -> rotated at p - shift. k: (..., Hkv, D); returns a new tensor."""
    cos, sin = cos_sin_cache[shift].float().chunk(2)  # (rot_dim // 2,) each
    half = cos.shape[0]
    x1, x2 = k[..., :half].float(), k[..., half:2 * half].float()
    out = k.clone()
    # Rotation by -shift: cos is even, sin is odd.
    out[..., :half] = (x1 * cos + x2 * sin).to(k.dtype)
    out[..., half:2 * half] = (x2 * cos - x1 * sin).to(k.dtype)
    return out


class StreamingKVCache:
    """A cache that never fills: S sinks + a sliding window of W tokens per row (plus `slack` spare slots).

    Speaks the cache step protocol (see cache.py); `base` is a contiguous cache (StaticKVCache) whose
    max_seq_len must be sink_tokens + window + slack. `rope_table(n)` returns the model's cos/sin table.
    """

    def __init__(self, base, span: SpanBias, rope_table, slack: int):
        if span.window is None:
            raise ValueError("StreamingKVCache needs a SpanBias with a window")
        if base.max_seq_len != span.sink_tokens + span.window + slack or slack < 1:
            raise ValueError("StreamingKVCache: base.max_seq_len must be sink_tokens + window + slack, slack >= 1")
        self.base, self.span, self.rope_table, self.slack = base, span, rope_table, slack
        self.evicted = torch.zeros_like(base.seqlens, dtype=torch.int64)  # (B,) tokens dropped so far

    k = property(lambda self: self.base.k)
    v = property(lambda self: self.base.v)
    block_table = property(lambda self: self.base.block_table)
    seqlens = property(lambda self: self.base.seqlens)
    step_seqlens = property(lambda self: self.base.step_seqlens)
    max_seq_len = property(lambda self: self.base.max_seq_len)
    position_bound = property(lambda self: self.base.max_seq_len)

    @property
    def tokens_held(self) -> int:
        """KV entries held over all rows: constant once the window has filled."""
        return int(self.base.seqlens.sum())

    def begin_step(self, num_new: int) -> torch.Tensor:
        self.make_room(num_new)
        return self.base.begin_step(num_new)

    def make_room(self, num_new: int) -> None:
        """Evicts from every row that could not take num_new more tokens (the C++ decode step, which
        writes the base cache itself, calls this before each step)."""
        if num_new > self.slack:
            raise ValueError(f"StreamingKVCache takes at most slack={self.slack} tokens per step, got {num_new}")
        for row, length in enumerate(self.base.seqlens.tolist()):
            if length + num_new > self.base.max_seq_len:
                self._evict(row, length)

    def _evict(self, row: int, length: int) -> None:
        """Moves the newest window - 1 tokens of `row` down behind the sinks; the ones in between go."""
        sinks, keep = self.span.sink_tokens, self.span.window - 1
        shift = length - keep - sinks
        table = self.rope_table(shift + 1)
        for layer in range(len(self.base.k)):
            k, v = self.base.k[layer][row], self.base.v[layer][row]  # (S_max, Hkv, D)
            k[sinks:sinks + keep] = rotate_keys_back(k[length - keep:length], shift, table)
            v[sinks:sinks + keep] = v[length - keep:length].clone()
        self.base.seqlens[row] = sinks + keep
        self.evicted[row] += shift

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.base.write(layer, k, v)

    def end_step(self, num_kept=None) -> None:
        self.base.end_step(num_kept)
