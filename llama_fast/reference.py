"""Pure-PyTorch reference implementations of every op.

Each fast version (Triton kernel, C++/CUDA extension) is tested against the function of the same name
here, and these are the "eager PyTorch" baseline of the benchmarks. Clarity over speed: the attention
reference materialises the (T, S) score matrix, which the kernels never do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import rope
from .span import SpanBias

# ----------------------------------------------------------------------------------------------------
# Normalisation, activation, rotary embedding


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm as LLaMA (and HF's LlamaRMSNorm) computes it, statistics in fp32.

    x: (..., dim); weight: (dim,). With residual (same shape as x): x + residual is normalised and
    returned as the new residual: (normed, x + residual). Without: normed.
    """
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(x.dtype)
    return (out, x) if residual is not None else out


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; gate, up: (..., ffn_dim)."""
    return F.silu(gate) * up


def rope_inv_freq(rot_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies (rot_dim // 2,) fp32, with HF's "linear" and "llama3" rope_scaling (llama_fast.rope:
    the one rule every route uses)."""
    return torch.tensor(rope.inv_freq(rot_dim, theta, scaling), dtype=torch.float32)


def rope_cos_sin_cache(max_positions: int, rot_dim: int, theta: float, scaling: dict | None = None):
    """(max_positions, rot_dim) fp32: [cos | sin] of position * inv_freq, each rot_dim // 2 wide."""
    inv_freq = rope_inv_freq(rot_dim, theta, scaling)
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor):
    """Rotates q and k in place (rotate-half / NeoX layout, as HF LLaMA) and returns them.

    q: (..., Hq, D); k: (..., Hk, D); positions: (...) int, the leading dims of q and k;
    cos_sin_cache: (max_positions, rot_dim) from rope_cos_sin_cache; the first rot_dim dims rotate.
    """
    cos, sin = cos_sin_cache[positions.long()].chunk(2, dim=-1)  # (..., rot_dim // 2) each
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    half = cos_sin_cache.shape[-1] // 2
    for x in (q, k):
        x1, x2 = x[..., :half].float(), x[..., half : 2 * half].float()
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        x[..., : 2 * half] = rotated.to(x.dtype)
    return q, k


# ----------------------------------------------------------------------------------------------------
# Span-biased attention (docs/ARCHITECTURE.md section 3)


def span_bucket(d: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's causal relative-position bucket of spans d >= 0 (int64 in, int64 out), computed in fp32."""
    exact = num_buckets // 2
    d = d.clamp(min=0)
    is_small = d < exact
    log_ratio = torch.log(d.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (num_buckets - exact)).to(torch.int64)
    large = large.clamp(max=num_buckets - 1)
    return torch.where(is_small, d, large)


def bucket_table(span: SpanBias) -> torch.Tensor | None:
    """(H, max_distance + 1) fp32: the learned span bias of span d is table[h, min(d, max_distance)].

    Every d >= max_distance falls in the last bucket (T5 clamps there), so the table is exact; it is
    built with the reference's own fp32 bucketing.
    """
    if span.bucket_bias is None:
        return None
    d = torch.arange(span.max_distance + 1)
    buckets = span_bucket(d, span.num_buckets, span.max_distance)  # (max_distance + 1,)
    return span.bucket_bias.detach().float().cpu()[:, buckets].contiguous()


def sink_position(t: torch.Tensor, span: SpanBias) -> torch.Tensor:
    """Where query t meets the sinks under a window: its position in a cache holding only the sinks and
    the window (StreamingLLM's positions), min(t, sink_tokens + window - 1); t without a window."""
    if span.window is None:
        return t
    return t.clamp(max=span.sink_tokens + span.window - 1)


def sinks_past_window(span: SpanBias, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
    """(Tq, Tk) bool: the pairs where a sink lies window or more positions behind the query, which are scored
    from sink_position(q_pos) (docs/ARCHITECTURE.md section 3); None for a span without sinks."""
    if not span.has_sinks:
        return None
    return (k_pos[None, :] < span.sink_tokens) & (q_pos[:, None] - k_pos[None, :] >= span.window)


def span_scores_bias(span: SpanBias, q_pos: torch.Tensor, k_pos: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Additive bias and mask (H, Tq, Tk) fp32 for query positions q_pos (Tq,) and key positions k_pos (Tk,).

    Invisible pairs get -inf; sinks past the window are biased at their distance from sink_position(q_pos).
    This is the T x S matrix the kernels never build.
    """
    d = q_pos[:, None] - k_pos[None, :]  # (Tq, Tk) span
    visible = d >= 0
    if span.window is not None:
        visible &= (d < span.window) | (k_pos[None, :] < span.sink_tokens)
    sinks = sinks_past_window(span, q_pos, k_pos)
    if sinks is not None:
        d = torch.where(sinks, sink_position(q_pos, span)[:, None] - k_pos[None, :], d)
    bias = torch.zeros(num_heads, *d.shape, dtype=torch.float32, device=d.device)
    if span.alibi_slopes is not None:
        bias -= span.alibi_slopes.float().to(d.device)[:, None, None] * d.clamp(min=0).float()
    if span.bucket_bias is not None:
        buckets = span_bucket(d, span.num_buckets, span.max_distance)
        bias += span.bucket_bias.float().to(d.device)[:, buckets]
    return bias.masked_fill(~visible, float("-inf"))


def _attend(q, k, v, q_pos, k_pos, span: SpanBias, scale: float, mask: torch.Tensor | None = None, q_sink=None):
    """One sequence. q: (Tq, H, D); k, v: (Tk, Hkv, D) -> (Tq, H, D), math in fp32 (fp64 if given fp64).

    mask: an extra (1 or H, Tq, Tk) mask on top of the span's: bool (False: invisible) or float (added).
    q_sink: (Tq, H, D), the queries as they meet sinks past the window (rotated at sink_position; None: q)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    num_heads, group = q.shape[1], q.shape[1] // k.shape[1]
    qf = q.to(compute).transpose(0, 1)  # (H, Tq, D)
    kf = k.to(compute).transpose(0, 1).repeat_interleave(group, dim=0)  # (H, Tk, D)
    vf = v.to(compute).transpose(0, 1).repeat_interleave(group, dim=0)
    scores = qf @ kf.transpose(1, 2)  # (H, Tq, Tk)
    sinks = sinks_past_window(span, q_pos, k_pos)
    if sinks is not None and q_sink is not None:
        scores = torch.where(sinks, q_sink.to(compute).transpose(0, 1) @ kf.transpose(1, 2), scores)
    scores = scores * scale
    if span.logit_softcap is not None:
        scores = span.logit_softcap * torch.tanh(scores / span.logit_softcap)
    scores = scores + span_scores_bias(span, q_pos, k_pos, num_heads).to(compute)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(compute)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key outputs 0
    return (probs @ vf).transpose(0, 1).to(q.dtype)


def span_attention(q, k, v, span: SpanBias = SpanBias(), scale: float | None = None, cu_seqlens=None, q_sink=None):
    """Span-biased causal attention for prefill, bottom-right aligned.

    Batched: q (B, T, H, D); k, v (B, S, Hkv, D) with S >= T; query t sits at position S - T + t.
    Varlen: q, k, v (total, H or Hkv, D) packed, cu_seqlens (B + 1,) int32 offsets (self-attention).
    q_sink: shaped like q, the queries rotated at sink_position (None: q; see _attend).
    Returns a tensor shaped like q.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is not None:
        out = torch.empty_like(q)
        bounds = cu_seqlens.tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            pos = torch.arange(end - start, device=q.device)
            out[start:end] = _attend(q[start:end], k[start:end], v[start:end], pos, pos, span, scale,
                                     q_sink=None if q_sink is None else q_sink[start:end])
        return out
    T, S = q.shape[1], k.shape[1]
    q_pos = torch.arange(S - T, S, device=q.device)
    k_pos = torch.arange(S, device=q.device)
    return torch.stack([_attend(q[b], k[b], v[b], q_pos, k_pos, span, scale, q_sink=None if q_sink is None else q_sink[b])
                        for b in range(q.shape[0])])


def masked_attention(q, k, v, mask, q_pos, k_pos, span: SpanBias = SpanBias(), scale: float | None = None, q_sink=None):
    """Span-biased attention under an explicit mask as well (padding, a caller's own pattern).

    q (B, Tq, H, D); k, v (B, Tk, Hkv, D); mask (B, 1 or H, Tq, Tk): bool (True: may attend) or float (added to
    the scores); q_pos (B, Tq), k_pos (B, Tk): the positions the span measures d = q_pos - k_pos with (a key
    is visible only when the span and the mask both allow it). A query with no visible key gives zeros.
    q_sink: like q, the queries rotated at sink_position (None: q; see _attend).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    mask = mask.expand(q.shape[0], *mask.shape[1:])
    q_pos, k_pos = q_pos.expand(q.shape[0], -1), k_pos.expand(q.shape[0], -1)
    return torch.stack([_attend(q[b], k[b], v[b], q_pos[b], k_pos[b], span, scale, mask[b],
                                None if q_sink is None else q_sink[b]) for b in range(q.shape[0])])


def gather_paged(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence of a paged cache (num_blocks, block_size, Hkv, D)."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = cache[block_table_row[:num_blocks].long()]  # (n, block_size, Hkv, D)
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def decode_attention(q, k_cache, v_cache, cache_seqlens, span: SpanBias = SpanBias(), block_table=None, scale=None,
                     q_sink=None):
    """Attention of a few new queries per sequence over a KV cache that already holds them.

    q: (B, Tq, H, D); cache_seqlens: (B,) int32, valid tokens per sequence including the Tq new ones, so
    query t of row b sits at position cache_seqlens[b] - Tq + t.
    Contiguous cache: k_cache, v_cache (B, S_max, Hkv, D). Paged cache: (num_blocks, block_size, Hkv, D)
    with block_table (B, max_blocks) int32. q_sink: like q, the queries rotated at sink_position (None: q;
    see _attend). Returns (B, Tq, H, D).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    Tq = q.shape[1]
    out = torch.empty_like(q)
    for b, length in enumerate(cache_seqlens.tolist()):
        if block_table is None:
            k, v = k_cache[b, :length], v_cache[b, :length]
        else:
            k = gather_paged(k_cache, block_table[b], length)
            v = gather_paged(v_cache, block_table[b], length)
        q_pos = torch.arange(length - Tq, length, device=q.device)
        k_pos = torch.arange(length, device=q.device)
        out[b] = _attend(q[b], k, v, q_pos, k_pos, span, scale, q_sink=None if q_sink is None else q_sink[b])
    return out


def sequence_logits(model, tokens: list[int]) -> torch.Tensor:
    """(N, vocab) fp32 logits after each of a sequence's N tokens, from the model's weights in plain PyTorch:
    the reference of the C++ session (csrc/core/session.h), window and sinks included. Query t scores the keys of
    its window at their own positions (true distances) and the sinks from sink_position(t), in RoPE and in
    the span bias alike (_attend). O(N^2) memory: for tests."""
    c, span = model.config, model.span
    f = {name: w.detach().float() for name, w in model.state_dict().items()}
    N, H, Hkv, D = len(tokens), c.n_heads, c.n_kv_heads, c.head_dim
    t = torch.arange(N)
    table = rope_cos_sin_cache(N, D, c.rope_theta, c.rope_scaling)

    def rotate(x, pos):  # x (N, heads, D) rotated at positions pos (N,)
        return apply_rope(x.clone(), x[:, :0].clone(), pos, table)[0]

    x = f["tok_embeddings.weight"][torch.tensor(tokens)]
    for l in range(c.n_layers):
        p = f"layers.{l}."
        h = rms_norm(x, f[p + "attention_norm.weight"], c.norm_eps)
        q, k, v = (h @ f[p + f"attention.{w}.weight"].T + f.get(p + f"attention.{w}.bias", 0.0) for w in ("wq", "wk", "wv"))
        q = q.view(N, H, D)
        att = _attend(rotate(q, t), rotate(k.view(N, Hkv, D), t), v.view(N, Hkv, D), t, t, span, D ** -0.5,
                      q_sink=rotate(q, sink_position(t, span)))
        x = x + att.reshape(N, H * D) @ f[p + "attention.wo.weight"].T
        h = rms_norm(x, f[p + "ffn_norm.weight"], c.norm_eps)
        gate, up = h @ f[p + "feed_forward.w1.weight"].T, h @ f[p + "feed_forward.w3.weight"].T
        x = x + swiglu(gate, up) @ f[p + "feed_forward.w2.weight"].T
    out = f.get("output.weight", f["tok_embeddings.weight"])
    return rms_norm(x, f["norm.weight"], c.norm_eps) @ out.T


# ----------------------------------------------------------------------------------------------------
# Sampling (docs/ARCHITECTURE.md section 3b)


def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, params) -> torch.Tensor:
    """logits (V,) fp32 and seen (V,) int counts of tokens so far -> penalised logits (V,), each clamped to
    fp32's finite range (a huge penalty makes its token the likeliest or the least likely, never inf)."""
    big = torch.finfo(torch.float32).max
    logits = logits.clone()
    counts = seen.to(logits.device)
    present = counts > 0
    if params.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(present, penalised.clamp(-big, big), logits)
    sub = params.frequency_penalty * counts.float() + params.presence_penalty * present.float()
    return (logits - sub.clamp(-big, big)).clamp(-big, big)


def filtered_probs(logits: torch.Tensor, params) -> torch.Tensor:
    """One row's sampling distribution after temperature, top_k, top_p and min_p: (V,) fp32 summing to 1.

    logits: (V,) fp32, penalties already applied; params.temperature > 0.
    """
    logits = logits.float()
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)  # finite for logits near fp32's max
    order = torch.argsort(probs, descending=True, stable=True)  # ties: lower id ranks first
    sorted_probs = probs[order]
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if params.top_k > 0:
        keep[params.top_k :] = False
    if params.top_p < 1.0:
        kept = sorted_probs * keep
        mass_before = torch.cumsum(kept, 0) - kept  # mass of the strictly more likely tokens
        keep &= mass_before < params.top_p * kept.sum()
    if params.min_p > 0.0:
        keep &= sorted_probs >= params.min_p * sorted_probs[0]
    keep[0] = True
    filtered = torch.zeros_like(probs)
    filtered[order[keep]] = sorted_probs[keep]
    return filtered / filtered.sum()


def row_uniform(seed: int, step: int) -> float:
    """The reference's counter-based uniform draw in [0, 1) for (seed, step): a pure function."""
    generator = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + step) % 2**63)
    return torch.rand((), generator=generator, dtype=torch.float64).item()


def sample(logits: torch.Tensor, params: list, *, step=0, seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,) int64, one SamplingParams per row (seed must be set when sampling).

    step: an int or a (B,) sequence, each row's draw counter. seen: (B, V) int counts for penalties.
    """
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"logits contain NaN or inf in rows {bad}")
    steps = [step] * logits.shape[0] if isinstance(step, int) else list(step)
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    for b, p in enumerate(params):
        row = logits[b].float().cpu()
        if seen is not None and p.has_penalties:
            row = apply_penalties(row, seen[b].cpu(), p)
        if p.greedy:
            out[b] = int(torch.argmax(row))  # first maximum: ties go to the lowest id
            continue
        cdf = torch.cumsum(filtered_probs(row, p).double(), 0)
        u = row_uniform(p.seed, steps[b]) * cdf[-1].item()
        out[b] = min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True)), row.numel() - 1)
    return out
