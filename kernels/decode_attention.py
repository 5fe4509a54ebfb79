"""Span-biased attention of new queries over a KV cache, contiguous or paged (flash-decoding).

Few queries (plain decoding Tq = 1, speculative decoding a few): one program takes one sequence, one KV
head and one split of its keys. Its BLOCK_M rows are all Tq x G queries of that KV group (G = H // Hkv
query heads), so each K/V tile is loaded once for the whole group. The visible key range (the window, or
everything) is cut into `num_splits` parts so that one long sequence fills the GPU, split 0 also taking
the sinks past the window (met by q_sink); a second small kernel merges the parts through their
log-sum-exp. With one split the first kernel writes the output directly.

Many queries (a prompt going through the cache, Tq x G > 64): the prefill kernel of span_attention.py in
its cache mode, reading the same contiguous or paged cache.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from llama_fast.span import SpanBias

from ._common import (SpanArgs, attend_block, block_d, check_device, check_dtypes, check_head_dim, check_out,
                      check_q_sink, last_dim_contiguous, sync_point)
from .span_attention import MODE_CACHE, launch_prefill

MAX_DECODE_ROWS = 64  # Tq * G above this goes to the prefill kernel
MAX_SPLITS = 64
POISON_SCRATCH = False  # tests set it: scratch buffers start NaN-filled


def decode_config(dtype: torch.dtype, rows: int) -> dict:
    """Launch configuration the dispatcher picks for Tq * G = rows (the compile check builds these)."""
    block_m = max(16, triton.next_power_of_2(rows))
    if dtype == torch.float32:
        return dict(BLOCK_M=block_m, BLOCK_N=32, num_warps=4, num_stages=2)
    # chosen with scripts/check_triton_compile.py: 32-key tiles leave ptxas no spills with every span
    # feature on, at head_dim 128, on sm_80 and sm_90 (64-key tiles spilled for some); 8 warps for 64 rows
    return dict(BLOCK_M=block_m, BLOCK_N=32, num_warps=4 if block_m <= 32 else 8, num_stages=2)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a small pretend GPU, so tests exercise several splits


def choose_num_splits(batch: int, kv_heads: int, key_span: int, block_n: int, device) -> int:
    """Enough programs for about two waves, each split at least 4 key blocks long."""
    programs = batch * kv_heads
    want = triton.cdiv(2 * _num_sms(device), programs)
    most = max(1, key_span // (4 * block_n))
    return int(max(1, min(want, most, MAX_SPLITS)))


@triton.jit
def _decode_kernel(
    Q, Q_sink, K, V, O, O_part, L_part,
    stride_qb, stride_qt, stride_qh,
    stride_sb, stride_st, stride_sh,  # Q_sink's (read under HAS_SINKS)
    stride_kb, stride_kt, stride_kh,  # paged: stride_kb is the stride between cache blocks
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    seq_ptr, bt_ptr, stride_bt, page_size,
    slopes_ptr, table_ptr, stride_tab,
    count_ptr,
    Tq, Hkv, G, D, num_splits,
    sm_scale, softcap, window, sink, max_dist,
    PAGED: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, SINGLE: tl.constexpr, COUNT: tl.constexpr,
):
    pid_bk = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bk // Hkv
    hkv = pid_bk % Hkv
    k_len = tl.load(seq_ptr + b)
    rows = tl.arange(0, BLOCK_M)
    t = rows // G  # query index
    head = hkv * G + rows % G
    row_mask = rows < Tq * G
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_pos = k_len - Tq + t
    q_mask = row_mask[:, None] & d_mask[None, :]
    slope = tl.zeros([BLOCK_M, 1], dtype=tl.float32)
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + head, mask=row_mask, other=0.0)[:, None]
    tab_ptr = table_ptr + head[:, None] * stride_tab
    k_off = b.to(tl.int64) * stride_kb
    v_off = b.to(tl.int64) * stride_vb

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo = 0
    if HAS_WINDOW:
        lo = (tl.maximum(k_len - Tq - window + 1, 0) // BLOCK_N) * BLOCK_N
    # this split's share of the window part, in whole blocks
    per_split = tl.cdiv(tl.cdiv(k_len - lo, BLOCK_N), num_splits) * BLOCK_N
    s_lo = lo + split * per_split
    s_hi = tl.minimum(k_len, s_lo + per_split)
    n_blocks = 0
    if HAS_SINKS:  # split 0 also takes the sinks past the window, met by q_sink (one query tile live at a time)
        q_sink = tl.load(Q_sink + b.to(tl.int64) * stride_sb + t[:, None] * stride_st + head[:, None] * stride_sh
                         + offs_d[None, :], mask=q_mask, other=0.0)
        sink_hi = tl.where((split == 0) & (k_len - 1 >= window), tl.cdiv(sink, BLOCK_N) * BLOCK_N, 0)
        for start in range(0, sink_hi, BLOCK_N):
            acc, m_i, l_i = attend_block(
                acc, m_i, l_i, q_sink, start, b, q_pos, k_len, K, V, k_off, v_off, stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh, hkv, offs_d, bt_ptr, stride_bt, page_size, D,
                slope, tab_ptr, sm_scale, softcap, window, sink, max_dist, BLOCK_N, PAGED,
                HAS_ALIBI, HAS_TABLE, HAS_WINDOW, HAS_SINKS, HAS_SOFTCAP, True, DOT_PRECISION)
            n_blocks += 1
    q = tl.load(Q + b.to(tl.int64) * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)
    for start in range(s_lo, s_hi, BLOCK_N):
        acc, m_i, l_i = attend_block(
            acc, m_i, l_i, q, start, b, q_pos, k_len, K, V, k_off, v_off, stride_kb, stride_kt, stride_kh,
            stride_vb, stride_vt, stride_vh, hkv, offs_d, bt_ptr, stride_bt, page_size, D,
            slope, tab_ptr, sm_scale, softcap, window, sink, max_dist, BLOCK_N, PAGED,
            HAS_ALIBI, HAS_TABLE, HAS_WINDOW, HAS_SINKS, HAS_SOFTCAP, False, DOT_PRECISION)
        n_blocks += 1
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if SINGLE:
        o_ptrs = O + b.to(tl.int64) * stride_ob + t[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    else:
        # partials: O_part (B, Tq, H, num_splits, BLOCK_D) fp32, L_part (B, Tq, H, num_splits) log2-sum-exp
        row_id = (b * Tq + t) * (Hkv * G) + head  # (BM,) index of (b, t, head)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        tl.store(L_part + row_id * num_splits + split, lse, mask=row_mask)
        op = O_part + ((row_id * num_splits + split) * BLOCK_D)[:, None].to(tl.int64) + offs_d[None, :]
        tl.store(op, out, mask=row_mask[:, None])
    if COUNT:
        tl.store(count_ptr + pid_bk * num_splits + split, n_blocks)


@triton.jit
def _combine_kernel(O, O_part, L_part, stride_ob, stride_ot, stride_oh, Tq, H, D, num_splits,
                    SPLITS_P2: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merges the splits of one (b, t, head) row: out = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m)."""
    row = tl.program_id(0)
    head = row % H
    t = (row // H) % Tq
    b = row // (H * Tq)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < num_splits
    lse = tl.load(L_part + row * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)  # (SPLITS_P2,)
    parts = tl.load(O_part + (row.to(tl.int64) * num_splits + offs_s[:, None]) * BLOCK_D + offs_d[None, :],
                    mask=s_mask[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(O + b.to(tl.int64) * stride_ob + t * stride_ot + head * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=offs_d < D)


def decode_attention(q, k_cache, v_cache, cache_seqlens, span: SpanBias = SpanBias(), block_table=None,
                     scale=None, *, q_sink: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     num_splits: int | None = None, block_counts: torch.Tensor | None = None,
                     check_bounds: bool = True):
    """Span-biased attention of Tq new queries per sequence over a KV cache that already holds them.

    q:             (B, Tq, H, D), any Tq >= 1 (1: decoding; a few: speculative; a prompt: prefill).
    k_cache, v_cache:
        contiguous (B, S_max, Hkv, D), or
        paged      (num_blocks, block_size, Hkv, D) with block_table (B, max_blocks) int32: token n of row b
                   is at [block_table[b, n // block_size], n % block_size].
    cache_seqlens: (B,) int32, valid tokens of each row *including* the Tq new ones, Tq <= len <= capacity;
                   query t of row b sits at position cache_seqlens[b] - Tq + t, key n at position n.
    span, scale:   as span_attention. H % Hkv == 0; D in {64, 80, 96, 128}; fp16, bf16 (fp32 for tests).
    q_sink:        shaped like q: the queries rotated at sink_position, for sinks past the window (None: q).
    out:           optional output (B, Tq, H, D), dtype of q, unit last-dim stride.
    num_splits:    override the split-KV heuristic (tests); block_counts: receives key blocks per program.
    check_bounds:  verify cache_seqlens and the used block_table entries against the cache (one device ->
                   host sync; skipped automatically under CUDA graph capture). A decode loop whose cache
                   object already guarantees them may pass False to save the sync per call.
    Returns (B, Tq, H, D), dtype of q, freshly allocated.
    """
    op = "decode_attention"
    check_device(op, q, k_cache, v_cache, cache_seqlens, block_table)
    check_dtypes(op, q=q, k_cache=k_cache, v_cache=v_cache)
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError(f"{op}: q must be (B, Tq, H, D) and the caches 4-D, got q {tuple(q.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    B, Tq, H, D = q.shape
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != D:
        raise ValueError(f"{op}: q head_dim {D} differs from the cache's {k_cache.shape[3]}")
    check_head_dim(op, D)
    if H % Hkv:
        raise ValueError(f"{op}: {H} query heads is not a multiple of {Hkv} KV heads")
    if Tq < 1:
        raise ValueError(f"{op}: needs at least one query per row")
    if cache_seqlens.dim() != 1 or cache_seqlens.shape[0] != B or cache_seqlens.dtype != torch.int32:
        raise ValueError(f"{op}: cache_seqlens must be ({B},) int32, got {cache_seqlens.dtype} "
                         f"{tuple(cache_seqlens.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.stride(-1) != 1:
            raise ValueError(f"{op}: {name} needs a unit stride along head_dim (got strides {cache.stride()}); "
                             "the cache is not copied behind your back")
    paged = block_table is not None
    if paged:
        if block_table.dim() != 2 or block_table.shape[0] != B or block_table.dtype != torch.int32:
            raise ValueError(f"{op}: block_table must be ({B}, max_blocks) int32, got {block_table.dtype} "
                             f"{tuple(block_table.shape)}")
        page_size = k_cache.shape[1]
        capacity = block_table.shape[1] * page_size
    else:
        if k_cache.shape[0] != B:
            raise ValueError(f"{op}: contiguous cache has batch {k_cache.shape[0]}, q has {B}")
        capacity = k_cache.shape[1]
    if check_bounds and sync_point():  # bounds checks read device values: one sync
        lens = cache_seqlens.long()
        problems = []
        if bool(((lens < Tq) | (lens > capacity)).any()):
            problems.append(f"cache_seqlens {cache_seqlens.tolist()} must lie in [Tq={Tq}, {capacity}] "
                            f"(the cache holds {capacity} tokens per row)")
        elif paged:
            used = torch.arange(block_table.shape[1], device=q.device)[None, :] < ((lens + page_size - 1) // page_size)[:, None]
            bad = used & ((block_table < 0) | (block_table >= k_cache.shape[0]))
            if bool(bad.any()):
                where = bad.nonzero()[0].tolist()
                problems.append(f"block_table[{where[0]}, {where[1]}] = {int(block_table[where[0], where[1]])} "
                                f"points outside the pool of {k_cache.shape[0]} blocks")
        if problems:
            raise ValueError(f"{op}: " + "; ".join(problems))
    q = last_dim_contiguous(q)
    q_sink = check_q_sink(op, q_sink, q)
    scale = D ** -0.5 if scale is None else float(scale)
    G = H // Hkv
    span_args = SpanArgs(span, H, q.device)
    out = check_out(op, out, q)
    if B == 0:
        return out
    rows = Tq * G
    if rows > MAX_DECODE_ROWS:
        return launch_prefill(q, k_cache, v_cache, out, mode=MODE_CACHE, seq=cache_seqlens, block_table=block_table,
                              T=Tq, S=0, B=B, H=H, G=G, span_args=span_args, scale=scale, max_q_len=Tq,
                              counts=block_counts, q_sink=q_sink)
    cfg = decode_config(q.dtype, rows)
    BN = cfg["BLOCK_N"]
    key_span = capacity
    if span.window is not None:
        key_span = min(capacity, span.window + Tq + BN)
    if num_splits is None:
        num_splits = choose_num_splits(B, Hkv, key_span, BN, q.device)
    num_splits = max(1, min(int(num_splits), MAX_SPLITS))
    single = num_splits == 1
    BD = block_d(D)
    if single:
        o_part = l_part = out  # unused
    else:
        o_part = torch.empty((B, Tq, H, num_splits, BD), dtype=torch.float32, device=q.device)
        l_part = torch.empty((B, Tq, H, num_splits), dtype=torch.float32, device=q.device)
        if POISON_SCRATCH:  # tests: an unwritten partial result must show up as NaN
            o_part.fill_(float("nan"))
            l_part.fill_(float("nan"))
    if block_counts is not None:
        block_counts.resize_(B * Hkv * num_splits).fill_(-1)
    dummy = span_args.slopes
    grid = (B * Hkv, num_splits)
    _decode_kernel[grid](
        q, q_sink, k_cache, v_cache, out, o_part, l_part,
        *q.stride()[:3], *q_sink.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], *out.stride()[:3],
        cache_seqlens, block_table if paged else dummy, block_table.stride(0) if paged else 0,
        page_size if paged else 1,
        span_args.slopes, span_args.table, span_args.table_stride,
        block_counts if block_counts is not None else dummy,
        Tq, Hkv, G, D, num_splits,
        scale, span_args.softcap, span_args.window, span_args.sink, span_args.max_dist,
        PAGED=paged, **span_args.flags(), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=BN, BLOCK_D=BD,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", SINGLE=single,
        COUNT=block_counts is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not single:
        _combine_kernel[(B * Tq * H,)](
            out, o_part, l_part, *out.stride()[:3], Tq, H, D, num_splits,
            SPLITS_P2=triton.next_power_of_2(num_splits), BLOCK_D=BD, num_warps=4,
        )
    return out
