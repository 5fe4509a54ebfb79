"""KV caches. Every cache speaks the same step protocol, which the model's attention uses:

    positions = cache.begin_step(T)     # (B, T) int64 cache positions of the T new tokens of each row
    for each layer:
        cache.write(layer, k, v)        # k, v: (B, T, Hkv, D) stored at those positions
        attend over cache.k[layer], cache.v[layer] with cache.step_seqlens (B,) int32 (incl. the new
        tokens) and cache.block_table (None for a contiguous cache)
    cache.end_step(n)                   # keep the first n[b] new tokens of row b (default: all T)

Rows of different lengths are right-padded: the padding's keys sit after the real tokens, so causal
attention never lets a real query see them, and end_step(n) drops them.
"""
from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    """The cache has no room for the tokens of this step."""


class StaticKVCache:
    """Preallocated contiguous cache: per layer K and V of shape (B, S_max, Hkv, D)."""

    block_table = None

    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 *, dtype=torch.float32, device="cpu"):
        if min(num_layers, batch_size, max_seq_len, n_kv_heads, head_dim) < 1:
            raise ValueError("StaticKVCache: every size must be >= 1")
        shape = (batch_size, max_seq_len, n_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_seq_len = max_seq_len
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)  # (B,) committed tokens
        self.step_seqlens = self.seqlens
        self._positions: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.seqlens.shape[0]

    def begin_step(self, num_new: int) -> torch.Tensor:
        longest = int(self.seqlens.max()) + num_new
        if longest > self.max_seq_len:
            raise CacheFullError(f"KV cache holds {self.max_seq_len} tokens per row; this step needs {longest}")
        steps = torch.arange(num_new, device=self.seqlens.device)
        self._positions = self.seqlens.long()[:, None] + steps[None, :]  # (B, T)
        self.step_seqlens = self.seqlens + num_new
        return self._positions

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        rows = torch.arange(self.batch_size, device=k.device)[:, None]
        self.k[layer][rows, self._positions] = k
        self.v[layer][rows, self._positions] = v

    def end_step(self, num_kept: torch.Tensor | int | None = None) -> None:
        if num_kept is None:
            self.seqlens = self.step_seqlens
        else:
            self.seqlens = self.seqlens + torch.as_tensor(num_kept, dtype=torch.int32, device=self.seqlens.device)
        self.step_seqlens = self.seqlens
        self._positions = None

    def reset(self) -> None:
        self.seqlens = torch.zeros_like(self.seqlens)
        self.step_seqlens = self.seqlens
