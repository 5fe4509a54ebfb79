"""Rotary position embedding applied in place to q and k (rotate-half / NeoX layout, as HF LLaMA)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, sync_point


@triton.jit
def _rope_kernel(Q, K, P, CS, stride_qt, stride_qh, stride_kt, stride_kh, stride_cs, Hq, Hk, HALF,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One token: rotates the first 2 * HALF dims of all its q heads and k heads."""
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(P + tok).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    c_mask = offs < HALF
    cos = tl.load(CS + pos * stride_cs + offs, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(CS + pos * stride_cs + HALF + offs, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    heads = tl.arange(0, BLOCK_H)
    for which in tl.static_range(2):
        if which == 0:
            base = Q + tok * stride_qt
            stride_h = stride_qh
            n_heads = Hq
        else:
            base = K + tok * stride_kt
            stride_h = stride_kh
            n_heads = Hk
        for h0 in range(0, n_heads, BLOCK_H):
            hh = h0 + heads
            mask = (hh < n_heads)[:, None] & c_mask[None, :]
            p1 = base + hh[:, None] * stride_h + offs[None, :]
            x1 = tl.load(p1, mask=mask, other=0.0)
            x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
            tl.store(p1, (f1 * cos - f2 * sin).to(x1.dtype), mask=mask)
            tl.store(p1 + HALF, (f2 * cos + f1 * sin).to(x1.dtype), mask=mask)


def _token_view(x: torch.Tensor, n_tok: int):
    """(n_tok, H, D) view of x sharing its storage, or None when its strides do not allow one."""
    if x.stride(-1) != 1:
        return None
    try:
        return x.view(n_tok, x.shape[-2], x.shape[-1])
    except RuntimeError:
        return None


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """Rotates q and k in place and returns them (llama_fast.reference.apply_rope).

    q: (..., Hq, D); k: (..., Hk, D) with the same leading dims (...) and dtype; positions: (...) integer
    positions, each < max_positions; cos_sin_cache: (max_positions, rot_dim) = [cos | sin], rot_dim even
    and <= D (the first rot_dim dims of every head rotate, the rest are left alone).
    """
    op = "apply_rope"
    check_device(op, q, k, positions, cos_sin_cache)
    lead = q.shape[:-2]
    if q.dim() < 2 or k.shape[:-2] != lead or tuple(positions.shape) != tuple(lead):
        raise ValueError(f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)} and positions {tuple(positions.shape)} "
                         "must share the leading dims (...)")
    if q.dtype != k.dtype or not q.dtype.is_floating_point:
        raise ValueError(f"{op}: q and k must share one floating dtype, got {q.dtype} and {k.dtype}")
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(f"{op}: positions must be integers, got {positions.dtype}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] % 2 or cos_sin_cache.shape[1] > min(q.shape[-1], k.shape[-1]):
        raise ValueError(f"{op}: cos_sin_cache must be (max_positions, rot_dim) with an even rot_dim <= head_dim, "
                         f"got {tuple(cos_sin_cache.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: q head_dim {q.shape[-1]} differs from k head_dim {k.shape[-1]}")
    n_tok = positions.numel()
    if n_tok == 0:
        return q, k
    if sync_point():
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= cos_sin_cache.shape[0]:
            raise ValueError(f"{op}: positions span [{lo}, {hi}] but the cache covers [0, {cos_sin_cache.shape[0] - 1}]")
    qv, kv = _token_view(q, n_tok), _token_view(k, n_tok)
    q_work = qv if qv is not None else q.reshape(n_tok, *q.shape[-2:]).contiguous()
    k_work = kv if kv is not None else k.reshape(n_tok, *k.shape[-2:]).contiguous()
    pos = positions.reshape(n_tok).contiguous()
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    half = cs.shape[1] // 2
    _rope_kernel[(n_tok,)](
        q_work, k_work, pos, cs, q_work.stride(0), q_work.stride(1), k_work.stride(0), k_work.stride(1), cs.stride(0),
        q.shape[-2], k.shape[-2], half, BLOCK_H=min(16, triton.next_power_of_2(max(q.shape[-2], k.shape[-2]))),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
    )
    if qv is None:  # strides without a token view: rotated in a copy, written back
        q.copy_(q_work.view(q.shape))
    if kv is None:
        k.copy_(k_work.view(k.shape))
    return q, k
