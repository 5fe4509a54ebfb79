"""Fused span-biased causal attention for prefill (docs/ARCHITECTURE.md section 3), FlashAttention-2 style.

One program computes BLOCK_M queries of one head: online softmax in fp32, scores biased from positions
inside the kernel (ALiBi slope, learned span table indexed by min(d, max_distance + 1), window + sinks
mask, softcap), nothing of size T x S in memory. Key blocks that the causal mask or the window hide are
never loaded: with a window the loop visits only the blocks within `window` of the query block (and, with
sinks, first the sink blocks, met by q_sink where they lie past the window), so the cost is
O(T * (window + sinks)), not O(T * S).

The same kernel reads a KV cache (contiguous or paged) for decode_attention when many queries arrive at
once (a prompt), see decode_attention.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from llama_fast.span import SpanBias

from ._common import (SpanArgs, attend_block, block_d, check_device, check_dtypes, check_head_dim, check_out,
                      check_q_sink, last_dim_contiguous)

MODE_BATCHED, MODE_VARLEN, MODE_CACHE = 0, 1, 2


def prefill_config(dtype: torch.dtype, head_dim: int, heavy_span: bool = False) -> dict:
    """Launch configuration the dispatcher picks (the compile check builds exactly these).

    heavy_span: the span uses buckets, a window or a softcap, whose per-score work needs registers that a
    (128 x 64) score tile at head_dim 128 leaves no room for (ptxas spills on sm_80/sm_90).
    """
    if dtype == torch.float32:  # accepted for tests: ieee fp32 dots need smaller tiles
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=32 if heavy_span else 64, num_warps=8, num_stages=3)


@triton.jit
def _span_fwd_kernel(
    Q, Q_sink, K, V, O,
    stride_qb, stride_qt, stride_qh,
    stride_sb, stride_st, stride_sh,  # Q_sink's (read under HAS_SINKS)
    stride_kb, stride_kt, stride_kh,  # paged: stride_kb is the stride between cache blocks
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    seq_ptr,  # VARLEN: cu_seqlens (B + 1,); CACHE: cache_seqlens (B,); else unused
    bt_ptr, stride_bt, page_size,  # PAGED: block_table (B, max_blocks)
    slopes_ptr, table_ptr, stride_tab,
    count_ptr,  # COUNT: number of key blocks each program loaded (debug/test output)
    T, S, H, G, D,  # T: queries (BATCHED/CACHE), S: keys (BATCHED); G = H // Hkv
    sm_scale, softcap, window, sink, max_dist,
    MODE: tl.constexpr, PAGED: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, COUNT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // G
    if MODE == 1:  # varlen: packed (total, H, D), self-attention per sequence
        start_tok = tl.load(seq_ptr + b)
        q_len = tl.load(seq_ptr + b + 1) - start_tok
        k_len = q_len
        q_off = start_tok.to(tl.int64) * stride_qt
        s_off = start_tok.to(tl.int64) * stride_st
        k_off = start_tok.to(tl.int64) * stride_kt
        v_off = start_tok.to(tl.int64) * stride_vt
        o_off = start_tok.to(tl.int64) * stride_ot
    else:
        if MODE == 2:  # KV cache: k_len valid tokens, the last T of them are the queries
            k_len = tl.load(seq_ptr + b)
        else:
            k_len = S
        q_len = T
        q_off = b.to(tl.int64) * stride_qb
        s_off = b.to(tl.int64) * stride_sb
        k_off = b.to(tl.int64) * stride_kb
        v_off = b.to(tl.int64) * stride_vb
        o_off = b.to(tl.int64) * stride_ob
    m0 = pid_m * BLOCK_M
    if m0 < q_len:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < q_len
        d_mask = offs_d < D
        first = k_len - q_len  # position of query 0 (bottom-right aligned)
        q_pos = first + offs_m
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(slopes_ptr + h)
        tab_ptr = table_ptr + h * stride_tab
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        hi = tl.minimum(k_len, first + m0 + BLOCK_M)  # causal: no key after the block's last query
        lo = 0
        n_blocks = 0
        if HAS_WINDOW:
            # the first visible key of the block's first query, rounded down to a block
            lo = (tl.maximum(first + m0 - window + 1, 0) // BLOCK_N) * BLOCK_N
        if HAS_SINKS:  # the sinks past the window, met by q_sink (loaded only for this loop: one query tile live)
            q_sink = tl.load(Q_sink + s_off + h * stride_sh + offs_m[:, None].to(tl.int64) * stride_st + offs_d[None, :],
                             mask=m_mask[:, None] & d_mask[None, :], other=0.0)
            sink_hi = tl.where(first + m0 + BLOCK_M - 1 >= window, tl.cdiv(sink, BLOCK_N) * BLOCK_N, 0)
            for start in range(0, sink_hi, BLOCK_N):
                acc, m_i, l_i = attend_block(
                    acc, m_i, l_i, q_sink, start, b, q_pos, k_len, K, V, k_off, v_off, stride_kb, stride_kt,
                    stride_kh, stride_vb, stride_vt, stride_vh, hkv, offs_d, bt_ptr, stride_bt, page_size, D,
                    slope, tab_ptr, sm_scale, softcap, window, sink, max_dist, BLOCK_N, PAGED,
                    HAS_ALIBI, HAS_TABLE, HAS_WINDOW, HAS_SINKS, HAS_SOFTCAP, True, DOT_PRECISION)
                n_blocks += 1
        q = tl.load(Q + q_off + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = attend_block(
                acc, m_i, l_i, q, start, b, q_pos, k_len, K, V, k_off, v_off, stride_kb, stride_kt,
                stride_kh, stride_vb, stride_vt, stride_vh, hkv, offs_d, bt_ptr, stride_bt, page_size, D,
                slope, tab_ptr, sm_scale, softcap, window, sink, max_dist, BLOCK_N, PAGED,
                HAS_ALIBI, HAS_TABLE, HAS_WINDOW, HAS_SINKS, HAS_SOFTCAP, False, DOT_PRECISION)
            n_blocks += 1
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # a row with no visible key outputs 0
        tl.store(O + o_off + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
        if COUNT:
            tl.store(count_ptr + pid_bh * tl.num_programs(0) + pid_m, n_blocks)


def launch_prefill(q, k, v, out, *, mode, seq=None, block_table=None, T, S, B, H, G, span_args: SpanArgs,
                   scale, max_q_len, counts=None, q_sink):
    """Launches _span_fwd_kernel. Token-major 4-D views (B, T, H, D) except VARLEN (total, H, D); q_sink
    is laid out like q."""
    D = q.shape[-1]
    cfg = prefill_config(q.dtype, D, span_args.heavy)
    paged = block_table is not None
    if mode == MODE_VARLEN:
        qs, ks, vs, os_ = (0, *q.stride()[:2]), (0, *k.stride()[:2]), (0, *v.stride()[:2]), (0, *out.stride()[:2])
        ss = (0, *q_sink.stride()[:2])
    else:
        qs, ks, vs, os_ = q.stride()[:3], k.stride()[:3], v.stride()[:3], out.stride()[:3]
        ss = q_sink.stride()[:3]
    grid = (triton.cdiv(max_q_len, cfg["BLOCK_M"]), B * H)
    if counts is not None:
        counts.resize_(grid[0] * grid[1]).fill_(-1)
    dummy = span_args.slopes
    _span_fwd_kernel[grid](
        q, q_sink, k, v, out, *qs, *ss, *ks, *vs, *os_,
        seq if seq is not None else dummy,
        block_table if paged else dummy, block_table.stride(0) if paged else 0, k.shape[1] if paged else 1,
        span_args.slopes, span_args.table, span_args.table_stride,
        counts if counts is not None else dummy,
        T, S, H, G, D,
        scale, span_args.softcap, span_args.window, span_args.sink, span_args.max_dist,
        MODE=mode, PAGED=paged, **span_args.flags(),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=block_d(D),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", COUNT=counts is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def span_attention(q, k, v, span: SpanBias = SpanBias(), scale: float | None = None, cu_seqlens=None, *,
                   q_sink: torch.Tensor | None = None, out: torch.Tensor | None = None,
                   block_counts: torch.Tensor | None = None):
    """Span-biased causal attention for prefill, FlashAttention's interface.

    Batched:  q (B, T, H, D); k, v (B, S, Hkv, D) with S >= T. Causal is aligned bottom-right: query t sits
              at position S - T + t, key s at position s.
    Varlen:   q (total, H, D); k, v (total, Hkv, D) packed sequences (self-attention, T = S per sequence);
              cu_seqlens (B + 1,) int32 with cu_seqlens[0] = 0 and cu_seqlens[-1] = total.
    span:     SpanBias (docs/ARCHITECTURE.md section 3): ALiBi slopes (H,), bucket_bias (H, num_buckets), window,
              sink_tokens, logit_softcap, in any combination.
    scale:    multiplies q . k (default 1 / sqrt(D)).
    q_sink:   shaped like q: the queries rotated at sink_position, for sinks past the window (None: q).
    H % Hkv == 0 (GQA/MQA: query head h reads KV head h // (H // Hkv)); D in {64, 80, 96, 128};
    dtype fp16 or bf16 (fp32 accepted, for tests); any strides with a unit last-dim stride (else copied).
    out:      optional output, shaped like q, same dtype (any strides with a unit last-dim stride).
    block_counts: optional int32 tensor; receives the number of key blocks each program loaded (tests).
    Returns out shaped like q, same dtype (freshly allocated unless given).
    """
    op = "span_attention"
    check_device(op, q, k, v, cu_seqlens)
    check_dtypes(op, q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    varlen = cu_seqlens is not None
    want_dim = 3 if varlen else 4
    if q.dim() != want_dim or k.dim() != want_dim:
        layout = "(total, H, D) with cu_seqlens" if varlen else "(B, T, H, D)"
        raise ValueError(f"{op}: expected q, k, v in the layout {layout}, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    D = q.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"{op}: q head_dim {D} differs from k head_dim {k.shape[-1]}")
    check_head_dim(op, D)
    H, Hkv = q.shape[-2], k.shape[-2]
    if H % Hkv:
        raise ValueError(f"{op}: {H} query heads is not a multiple of {Hkv} KV heads")
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    q_sink = check_q_sink(op, q_sink, q)
    scale = D ** -0.5 if scale is None else float(scale)
    span_args = SpanArgs(span, H, q.device)
    out = check_out(op, out, q)
    if varlen:
        if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"{op}: cu_seqlens must be a (B + 1,) int32 tensor, got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"{op}: varlen q has {q.shape[0]} tokens, k has {k.shape[0]}")
        bounds = cu_seqlens.tolist()
        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        if bounds[0] != 0 or bounds[-1] != q.shape[0] or min(lengths) < 0:
            raise ValueError(f"{op}: cu_seqlens must rise from 0 to total={q.shape[0]}, got {bounds}")
        B, max_len = len(lengths), max(lengths)
        if max_len == 0:
            return out
        return launch_prefill(q, k, v, out, mode=MODE_VARLEN, seq=cu_seqlens, T=0, S=0, B=B, H=H, G=H // Hkv,
                              span_args=span_args, scale=scale, max_q_len=max_len, counts=block_counts, q_sink=q_sink)
    B, T, S = q.shape[0], q.shape[1], k.shape[1]
    if k.shape[0] != B:
        raise ValueError(f"{op}: q has batch {B}, k has batch {k.shape[0]}")
    if S < T:
        raise ValueError(f"{op}: needs S >= T (keys include the queries), got T={T}, S={S}")
    if T == 0 or B == 0:
        return out
    return launch_prefill(q, k, v, out, mode=MODE_BATCHED, T=T, S=S, B=B, H=H, G=H // Hkv,
                          span_args=span_args, scale=scale, max_q_len=T, counts=block_counts, q_sink=q_sink)
