"""KV caches, backed by the C++ extension (llama_fast._C). Every cache speaks the same step protocol, which
the model's attention uses:

    positions = cache.begin_step(T)     # (B, T) int64 positions of the T new tokens of each row (for RoPE:
                                        # true positions, which exceed the cache index once a window evicts);
                                        # cache.position_bound: an int above all of them, known on the host
    for each layer:
        cache.write(layer, k, v)        # k, v: (B, T, Hkv, D) stored at those positions
        attend over cache.k[layer], cache.v[layer] with cache.step_seqlens (B,) int32 (incl. the new
        tokens) and cache.block_table (None for a contiguous cache)
    cache.end_step(n)                   # keep the first n[b] new tokens of row b (default: all T)

Rows of different lengths are right-padded: the padding's keys sit after the real tokens, so causal
attention never lets a real query see them, and end_step(n) drops them.

StaticKVCache: preallocated (B, S_max, Hkv, D) per layer (LLM.logits: one full forward pass).
PagedKVCache: a pool of fixed-size blocks per layer, (num_blocks, block_size, Hkv, D) for K and for V,
read through block_table (B, max_blocks) int32; sequences are added, forked (copy-on-write: forks share
the parent's blocks until one writes into a shared block), freed, and evicted by a window with sinks.
"""
from __future__ import annotations

import torch

from ._ext import ext
from .errors import CacheFullError


def _kept_counts(num_kept, num_new: int, batch: int) -> list[int]:
    if num_kept is None:
        return [num_new] * batch
    kept = torch.as_tensor(num_kept).reshape(-1).tolist() if not isinstance(num_kept, int) else [num_kept] * batch
    if len(kept) != batch:
        raise ValueError(f"end_step: {len(kept)} kept counts for a batch of {batch}")
    for n in kept:
        if not (isinstance(n, int) and 0 <= n <= num_new):
            raise ValueError(f"end_step: kept counts must be ints in [0, {num_new}], got {n!r}")
    return kept


def check_room(longest: int, max_seq_len: int) -> None:
    """Raises CacheFullError when a step would make a row `longest` tokens long in a cache of max_seq_len."""
    if longest > max_seq_len:
        raise CacheFullError(f"KV cache holds {max_seq_len} tokens per row; this step needs {longest}")


def _check_num_new(num_new) -> None:
    if not isinstance(num_new, int) or num_new < 0:
        raise ValueError(f"begin_step: num_new must be an int >= 0, got {num_new!r}")


def _check_sizes(**sizes):
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class StaticKVCache:
    """Preallocated contiguous cache: per layer K and V of shape (B, S_max, Hkv, D)."""

    block_table = None

    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 *, dtype=torch.float32, device="cpu"):
        _check_sizes(num_layers=num_layers, batch_size=batch_size, max_seq_len=max_seq_len,
                     n_kv_heads=n_kv_heads, head_dim=head_dim)
        self._C = ext()
        shape = (batch_size, max_seq_len, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_layers = num_layers
        self.max_seq_len = max_seq_len
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)  # (B,) committed tokens
        self.step_seqlens = self.seqlens
        self._start: torch.Tensor | None = None  # (B,) int32 start of this step's tokens
        self._num_new = 0

    @property
    def batch_size(self) -> int:
        return self.seqlens.shape[0]

    @property
    def position_bound(self) -> int:
        """An int above every position of the current step, known without reading the device."""
        return self.max_seq_len

    def begin_step(self, num_new: int) -> torch.Tensor:
        _check_num_new(num_new)
        check_room(int(self.seqlens.max()) + num_new, self.max_seq_len)
        self._start = self.seqlens.clone()
        self._start_cpu = self._start.cpu()  # validated on the host without a device sync per layer
        self._num_new = num_new
        steps = torch.arange(num_new, device=self.seqlens.device)
        self.step_seqlens = self.seqlens + num_new
        return self.seqlens.long()[:, None] + steps[None, :]  # (B, T)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self._start is None:
            raise RuntimeError("write: call begin_step first")
        if k.shape[1] != self._num_new:
            raise ValueError(f"write: this step has {self._num_new} new tokens, k has {k.shape[1]}")
        dtype = self.k[layer].dtype
        self._C.static_write(self.k[layer], self.v[layer], k.to(dtype), v.to(dtype), self._start_cpu)

    def end_step(self, num_kept: torch.Tensor | int | None = None) -> None:
        if self._start is None:
            raise RuntimeError("end_step: call begin_step first")
        kept = _kept_counts(num_kept, self._num_new, self.batch_size)
        self.seqlens = self._start + torch.tensor(kept, dtype=torch.int32, device=self.seqlens.device)
        self.step_seqlens = self.seqlens
        self._start = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Appends k, v (num_layers, B, T, Hkv, D) to every row (begin_step + write per layer + end_step)."""
        self.begin_step(k.shape[2])
        for layer in range(self.num_layers):
            self.write(layer, k[layer], v[layer])
        self.end_step()

    def lengths(self) -> list[int]:
        return self.seqlens.tolist()

    def reset(self) -> None:
        self.seqlens = torch.zeros_like(self.seqlens)
        self.step_seqlens = self.seqlens
        self._start = None


class PagedKVCache:
    """Paged cache: per layer K and V pools (num_blocks, block_size, Hkv, D), block tables in C++.

    Sequences: add_sequence() -> id, fork(id) -> id (copy-on-write), free(id). set_batch(ids) chooses which
    sequences the rows of the next steps are (row b = ids[b]); then the step protocol above. With
    window (and sink_tokens), begin_step first drops the tokens no future query can see (SpanBias
    semantics: key j is visible to query i if i - j < window or j < sink_tokens), a block's worth at a
    time: their blocks go back to the pool, so a stream of any length uses constant memory. The survivors
    are re-indexed compactly (sinks first, then the rest in order), their keys untouched: begin_step returns
    true positions (index + the tokens evicted), and attention by index gives the same numbers as if
    nothing had been evicted (docs/session.md says why).
    Running out of blocks raises CacheFullError and leaves the cache unchanged.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 *, dtype=torch.float32, device="cpu", window: int | None = None, sink_tokens: int = 0,
                 max_seq_len: int | None = None, scratch_block: bool = False):
        """scratch_block: the pools get one block more than the manager hands out (index num_blocks), where
        the padding rows of a captured decode step write (cuda_graphs.PagedDecodeGraphs)."""
        _check_sizes(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size, n_kv_heads=n_kv_heads,
                     head_dim=head_dim)
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        if not isinstance(sink_tokens, int) or sink_tokens < 0 or (window is None and sink_tokens):
            raise ValueError(f"sink_tokens must be an int >= 0 (and needs a window), got {sink_tokens!r}")
        if window is not None and sink_tokens >= window:
            raise ValueError(f"sink_tokens ({sink_tokens}) must be smaller than window ({window})")
        self._C = ext()
        self.manager = self._C.PagedBlockManager(num_blocks, block_size)
        shape = (num_blocks + scratch_block, block_size, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_layers, self.block_size = num_layers, block_size
        self.window, self.sink_tokens = window, sink_tokens
        self.max_seq_len = max_seq_len if max_seq_len is not None else 2**31 - 1
        self.device = torch.device(device)
        self.seq_ids: list[int] = []
        self.position_bound = 0  # above every position of the current step (set by begin_step)
        self.seqlens = torch.zeros(0, dtype=torch.int32, device=device)
        self.step_seqlens = self.seqlens
        self.block_table = torch.zeros(0, 1, dtype=torch.int32, device=device)
        self._start: torch.Tensor | None = None
        self._num_new = 0

    @classmethod
    def for_span(cls, num_layers, num_blocks, block_size, n_kv_heads, head_dim, span=None, **kw):
        """A cache that evicts as `span` (a SpanBias) allows: its window and sink_tokens."""
        if span is not None and span.window is not None:
            kw.setdefault("window", span.window)
            kw.setdefault("sink_tokens", span.sink_tokens)
        return cls(num_layers, num_blocks, block_size, n_kv_heads, head_dim, **kw)

    # ---- sequences ----
    @property
    def num_blocks(self) -> int:
        return self.manager.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.manager.num_free_blocks

    @property
    def blocks_in_use(self) -> int:
        """Blocks held by live sequences: constant once a windowed stream has filled its window."""
        return self.manager.num_blocks - self.manager.num_free_blocks

    @property
    def batch_size(self) -> int:
        return len(self.seq_ids)

    def add_sequence(self) -> int:
        return self.manager.add_sequence()

    def fork(self, seq: int) -> int:
        self._not_in_step("fork")
        return self.manager.fork(seq)

    def free(self, seq: int) -> None:
        self._not_in_step("free")
        self.manager.free(seq)
        if seq in self.seq_ids:
            self.set_batch([s for s in self.seq_ids if s != seq])

    def length(self, seq: int) -> int:
        return self.manager.length(seq)

    def evicted(self, seq: int) -> int:
        """How many of the sequence's tokens eviction has dropped so far."""
        return self.manager.evicted(seq)

    def set_batch(self, seq_ids) -> None:
        """Rows of the following steps: row b is sequence seq_ids[b] (distinct, live ids)."""
        self._not_in_step("set_batch")
        seq_ids = [int(s) for s in seq_ids]
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"set_batch: sequence ids must be distinct, got {seq_ids}")
        for s in seq_ids:
            if s not in self.manager:
                raise IndexError(f"set_batch: unknown or freed sequence id {s}")
        self.seq_ids = seq_ids
        self._refresh()

    def _refresh(self) -> None:
        ids = self.seq_ids
        self.seqlens = torch.tensor([self.manager.length(s) for s in ids], dtype=torch.int32).to(self.device)
        self.step_seqlens = self.seqlens
        self.block_table = self.manager.block_table(ids).to(self.device)

    def _not_in_step(self, op: str) -> None:
        if self._start is not None:
            raise RuntimeError(f"{op}: not allowed between begin_step and end_step")

    def _copy(self, ops: torch.Tensor) -> None:
        if ops.shape[0]:
            self._C.copy_blocks(self.k, self.v, ops)

    def evict_invisible(self, seq_ids) -> None:
        """Under a window, drops the tokens of seq_ids that no later query can see (whole blocks' worth);
        a no-op otherwise. Changes no number (docs/session.md), so it may run any time before a step."""
        if self.window is not None:
            self._copy(self.manager.evict([int(s) for s in seq_ids], self.window, self.sink_tokens))

    def blocks_needed(self, seq_ids, num_new: int) -> int:
        """Free blocks a step of num_new tokens for each of seq_ids would take (after evict_invisible);
        CacheFullError for a step past what a sequence can hold (2^31 - 1 tokens)."""
        try:
            return self.manager.blocks_needed([int(s) for s in seq_ids], num_new)
        except self._C.KVCacheFull as err:
            raise CacheFullError(str(err)) from None

    def reserve(self, num_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The host side of begin_step for the current batch: evicts, makes room for num_new tokens per row
        (copy-on-write copies done), and returns (start (B,) int32 cache indices, true start (B,) int64)."""
        ids = self.seq_ids
        self.evict_invisible(ids)
        try:
            start, copies = self.manager.reserve(ids, num_new, self.max_seq_len)
        except self._C.KVCacheFull as err:
            self._refresh()
            raise CacheFullError(str(err)) from None
        self._copy(copies)
        return start, start.long() + torch.tensor([self.manager.evicted(s) for s in ids], dtype=torch.int64)

    # ---- step protocol ----
    def begin_step(self, num_new: int) -> torch.Tensor:
        _check_num_new(num_new)
        self._not_in_step("begin_step")
        ids = self.seq_ids
        start, true_start = self.reserve(num_new)
        self._num_new = num_new
        self._start_cpu, self._table_cpu = start, self.manager.block_table(ids)  # host copies for write()
        self.position_bound = int(true_start.max()) + num_new if len(ids) else num_new
        self._start = start.to(self.device)
        self.seqlens = self._start
        self.step_seqlens = self._start + num_new
        self.block_table = self._table_cpu.to(self.device)
        return true_start.to(self.device)[:, None] + torch.arange(num_new, device=self.device)[None, :]  # (B, T)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self._start is None:
            raise RuntimeError("write: call begin_step first")
        if k.dim() != 4 or k.shape[1] != self._num_new:
            raise ValueError(f"write: this step has {self._num_new} new tokens per row, k has shape {tuple(k.shape)}")
        dtype = self.k[layer].dtype
        self._C.paged_write(self.k[layer], self.v[layer], k.to(dtype), v.to(dtype), self._table_cpu, self._start_cpu)

    def commit(self, kept: list[int]) -> None:
        """The host side of end_step: row b keeps kept[b] of the tokens reserve made room for."""
        self.manager.commit(self.seq_ids, kept)
        self._refresh()

    def end_step(self, num_kept: torch.Tensor | int | None = None) -> None:
        if self._start is None:
            raise RuntimeError("end_step: call begin_step first")
        self._start = None
        self.commit(_kept_counts(num_kept, self._num_new, self.batch_size))

    def append(self, seq_ids, k: torch.Tensor, v: torch.Tensor) -> None:
        """Appends k, v (num_layers, B, T, Hkv, D) to the sequences seq_ids (B,) in one step."""
        self.set_batch(seq_ids)
        self.begin_step(k.shape[2])
        try:
            for layer in range(self.num_layers):
                self.write(layer, k[layer], v[layer])
        except Exception:
            self.end_step(0)
            raise
        self.end_step()

    # ---- inspection ----
    def gather(self, seq: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence's K and V in one layer as contiguous (length, Hkv, D) tensors (for tests)."""
        blocks = torch.tensor(self.manager.blocks(seq), dtype=torch.int32)
        length = self.manager.length(seq)
        return (self._C.gather_paged(self.k[layer], blocks, length),
                self._C.gather_paged(self.v[layer], blocks, length))
