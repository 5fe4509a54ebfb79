"""Shared pieces of the attention kernels: input checks, the span tables, and the in-kernel span scores.

Not an op: span_attention.py (prefill) and decode_attention.py (KV cache) both use it.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llama_fast.ops import BackendError
from llama_fast.reference import span_bucket
from llama_fast.span import SpanBias, derived_table

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (64, 80, 96, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(op: str, *tensors: torch.Tensor) -> None:
    """All tensors on one device, and that device can run Triton (CUDA, or CPU under the interpreter)."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{op}: tensors are on different devices {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not interpreted():
        raise BackendError(
            f"{op}: the Triton kernels need CUDA tensors (got {device.type}); "
            "set TRITON_INTERPRET=1 before importing Triton to run them on CPU tensors"
        )


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any strides except along the last dim; copy only when that one is not 1."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def sync_point() -> bool:
    """Host-side checks that read device values (a sync) are skipped while a CUDA graph is captured."""
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


# ----------------------------------------------------------------------------------------------------
# Span tables (host side). The bias of the learned span table only depends on min(d, max_distance + 1):
# bucket(d) = num_buckets - 1 for every d > max_distance. So per head a table of max_distance + 2
# entries, computed with the reference's own fp32 bucketing, replaces the T5 log formula in the kernel.

class SpanArgs:
    """What the kernels need from a SpanBias: flags, scalars and tables pre-scaled by log2(e)."""

    def __init__(self, span: SpanBias, num_heads: int, device: torch.device):
        span.check_heads(num_heads)
        self.has_alibi = span.alibi_slopes is not None
        self.has_table = span.bucket_bias is not None
        self.has_window = span.window is not None
        self.has_sinks = span.has_sinks
        self.has_softcap = span.logit_softcap is not None
        self.window = span.window if span.window is not None else 0
        self.sink = span.sink_tokens
        self.softcap = float(span.logit_softcap) if span.logit_softcap is not None else 1.0
        self.max_dist = span.max_distance
        self.heavy = self.has_table or self.has_window or self.has_softcap  # more registers per score
        dummy = None
        if self.has_alibi:
            self.slopes = derived_table(span, "slopes", device, lambda: span.alibi_slopes.float().to(device) * LOG2E)
        else:
            dummy = torch.zeros(1, dtype=torch.float32, device=device)
            self.slopes = dummy
        if self.has_table:
            self.table = derived_table(span, "table", device, lambda: _bucket_table(span, device))
        else:
            self.table = dummy if dummy is not None else torch.zeros(1, dtype=torch.float32, device=device)
        self.table_stride = self.table.stride(0) if self.has_table else 0

    def flags(self) -> dict:
        return dict(HAS_ALIBI=self.has_alibi, HAS_TABLE=self.has_table, HAS_WINDOW=self.has_window,
                    HAS_SINKS=self.has_sinks, HAS_SOFTCAP=self.has_softcap)


def _bucket_table(span: SpanBias, device) -> torch.Tensor:
    d = torch.arange(span.max_distance + 2, dtype=torch.int64)
    buckets = span_bucket(d, span.num_buckets, span.max_distance)  # (max_distance + 2,)
    table = span.bucket_bias.detach().float().cpu()[:, buckets] * LOG2E  # (H, max_distance + 2)
    return table.contiguous().to(device)


# ----------------------------------------------------------------------------------------------------
# In-kernel span scores


@triton.jit
def span_scores(qk, q_pos, k_pos, k_len, slope, tab_ptr, sm_scale, softcap, window, sink, max_dist,
                HAS_ALIBI: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, SINK_PART: tl.constexpr):
    """Scores in log2 units (BM, BN) fp32 from raw dot products qk (BM, BN), -inf where invisible.

    q_pos (BM,) and k_pos (BN,) int32 positions; slope: scalar or (BM, 1), pre-scaled by log2(e);
    tab_ptr: pointer (scalar or (BM, 1)) to this head's span table row, pre-scaled by log2(e).
    HAS_SINKS (a window with sinks): a sink window or more behind its query is met by another query (q_sink,
    rotated at sink_position) at its distance from sink_position (docs/ARCHITECTURE.md section 3), so the
    kernels score it in a loop of its own: SINK_PART scores only those pairs, otherwise only the window's.
    """
    d = q_pos[:, None] - k_pos[None, :]  # (BM, BN) span
    visible = k_pos[None, :] < k_len
    if SINK_PART:
        visible = visible & (k_pos[None, :] < sink) & (d >= window)
        d = tl.minimum(q_pos, sink + window - 1)[:, None] - k_pos[None, :]
    elif HAS_SINKS:
        visible = visible & (d >= 0) & (d < window)
    else:
        visible = visible & (d >= 0)
        if HAS_WINDOW:
            visible = visible & (d < window)
    if HAS_SOFTCAP:
        x = qk * (sm_scale / softcap)
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at +-inf, no libdevice needed
        th = 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)
        s = th * (softcap * 1.4426950408889634)
    else:
        s = qk * (sm_scale * 1.4426950408889634)
    if HAS_ALIBI:
        s = s - slope * d.to(tl.float32)
    if HAS_TABLE:
        idx = tl.minimum(tl.maximum(d, 0), max_dist + 1)
        s = s + tl.load(tab_ptr + idx)
    return tl.where(visible, s, float("-inf"))


@triton.jit
def load_kv_tile(base, b, row_off, stride_blk, stride_t, hkv, stride_h, offs_n, offs_d, k_len, bt_ptr, stride_bt,
                 page_size, D, PAGED: tl.constexpr):
    """(BN, BD) tile of keys (or values) offs_n of KV head hkv; zeros beyond k_len and head_dim.

    Contiguous: key n at base + row_off + n * stride_t. Paged: block_table[b, n // page_size] picks the
    block (stride_blk apart), n % page_size the row in it (stride_t apart).
    """
    n_mask = offs_n < k_len
    if PAGED:
        blk = tl.load(bt_ptr + b * stride_bt + offs_n // page_size, mask=n_mask, other=0)
        rows = blk.to(tl.int64) * stride_blk + (offs_n % page_size) * stride_t
    else:
        rows = row_off + offs_n.to(tl.int64) * stride_t
    ptrs = base + rows[:, None] + hkv * stride_h + offs_d[None, :]
    return tl.load(ptrs, mask=n_mask[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def attend_block(acc, m_i, l_i, q, start, b, q_pos, k_len,
                 K, V, k_row_off, v_row_off, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                 hkv, offs_d, bt_ptr, stride_bt, page_size, D,
                 slope, tab_ptr, sm_scale, softcap, window, sink, max_dist,
                 BLOCK_N: tl.constexpr, PAGED: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_TABLE: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 SINK_PART: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block [start, start + BLOCK_N) folded into the running (acc, m_i, l_i) of the queries q (BM, BD)
    (online softmax; span_scores says which pairs count)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    k = load_kv_tile(K, b, k_row_off, stride_kb, stride_kt, hkv, stride_kh, offs_n, offs_d, k_len,
                     bt_ptr, stride_bt, page_size, D, PAGED)  # (BN, BD)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BM, BN) fp32
    s = span_scores(qk, q_pos, offs_n, k_len, slope, tab_ptr, sm_scale, softcap, window, sink, max_dist,
                    HAS_ALIBI, HAS_TABLE, HAS_WINDOW, HAS_SINKS, HAS_SOFTCAP, SINK_PART)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no visible key yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_kv_tile(V, b, v_row_off, stride_vb, stride_vt, hkv, stride_vh, offs_n, offs_d, k_len,
                     bt_ptr, stride_bt, page_size, D, PAGED)  # (BN, BD)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


def check_q_sink(op: str, q_sink: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """q_sink, checked against q (None: q itself, for a span whose sinks carry no rotation of their own)."""
    if q_sink is None:
        return q
    if q_sink.shape != q.shape or q_sink.dtype != q.dtype or q_sink.device != q.device:
        raise ValueError(f"{op}: q_sink must be shaped like q {q.dtype} {tuple(q.shape)} on {q.device}, got "
                         f"{q_sink.dtype} {tuple(q_sink.shape)} on {q_sink.device}")
    return last_dim_contiguous(q_sink)


def check_out(op: str, out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A caller's output buffer must match `like` in shape, dtype, device and have a unit last stride."""
    if out is None:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device or out.stride(-1) != 1:
        raise ValueError(f"{op}: out must be {like.dtype} {tuple(like.shape)} on {like.device} with a unit "
                         f"last stride, got {out.dtype} {tuple(out.shape)} on {out.device} strides {out.stride()}")
    return out


def block_d(head_dim: int) -> int:
    return triton.next_power_of_2(head_dim)


def check_head_dim(op: str, head_dim: int) -> None:
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: head_dim {head_dim} is not supported; use one of {SUPPORTED_HEAD_DIMS}")


def check_dtypes(op: str, **tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    first = next(iter(dtypes.values()))
    if first not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: dtype {first} is not supported; use fp16, bf16 or fp32")
    if any(d != first for d in dtypes.values()):
        raise ValueError(f"{op}: dtypes differ: {dtypes}")
