#!/usr/bin/env python3
"""Span-biased attention on a GPU: our Triton kernels against SDPA, FlexAttention and the reference.

Prefill (TFLOP/s over the visible score pairs: 4 * D flops per pair and head) and decode (GB/s of K/V
actually read, and that as a fraction of this GPU's measured device-to-device copy bandwidth), for the
span variants plain causal, window, window + sinks, ALiBi, learned buckets and all at once.

Compared side by side in one run:
  ours     llama_fast.kernels (the ops' triton backend)
  sdpa     torch.nn.functional.scaled_dot_product_attention (plain causal only: it has no span bias)
  flex     torch.nn.attention.flex_attention, compiled, with the same span as score_mod + block mask
  ref      llama_fast.reference (eager PyTorch; only where its T x S matrix fits comfortably)

Writes benchmarks/out/bench_attention.json and prints a table. Needs CUDA.
Run: python benchmarks/bench_attention.py [--quick] [--dtype bf16|fp16]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from llama_fast import reference
from llama_fast.reference import span_bucket
from llama_fast.span import SpanBias, alibi_slopes

OUT = Path(__file__).resolve().parent / "out"


def bench(fn, warmup=3, reps=20) -> float:
    """Median milliseconds of fn() with CUDA events (triton.testing.do_bench's method, fixed counts)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), warmup=2, reps=10)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def spans(H: int, device) -> dict[str, SpanBias]:
    g = torch.Generator().manual_seed(0)
    buckets = (0.5 * torch.randn(H, 32, generator=g)).to(device)
    slopes = alibi_slopes(H).to(device)
    return {
        "causal": SpanBias(),
        "window": SpanBias(window=1024),
        "window+sinks": SpanBias(window=1024, sink_tokens=4),
        "alibi": SpanBias(alibi_slopes=slopes),
        "buckets": SpanBias(bucket_bias=buckets, max_distance=128),
        "all": SpanBias(alibi_slopes=slopes, bucket_bias=buckets, max_distance=128, window=1024, sink_tokens=4,
                        logit_softcap=30.0),
    }


def visible_pairs(T: int, S: int, span: SpanBias) -> int:
    """Number of visible (query, key) pairs: queries at positions S - T .. S - 1."""
    pos = torch.arange(S - T, S, dtype=torch.float64)
    n = pos + 1
    if span.window is not None:
        n = torch.minimum(n, torch.tensor(float(span.window))) + torch.clamp(
            torch.minimum(pos + 1 - span.window, torch.tensor(float(span.sink_tokens))), min=0)
    return int(n.sum().item())


def flex_fns(span: SpanBias, T: int, S: int, H: int, device):
    """(score_mod, mask_mod) for FlexAttention implementing docs/ARCHITECTURE.md section 3 with query offset S - T."""
    offset = S - T
    table = None
    if span.bucket_bias is not None:
        d = torch.arange(span.max_distance + 2)
        table = span.bucket_bias.float()[:, span_bucket(d, span.num_buckets, span.max_distance).to(device)]
    slopes = span.alibi_slopes.float() if span.alibi_slopes is not None else None
    cap = span.logit_softcap
    max_d = span.max_distance + 1

    def score_mod(score, b, h, q_idx, kv_idx):
        d = q_idx + offset - kv_idx
        if cap is not None:
            score = cap * torch.tanh(score / cap)
        if slopes is not None:
            score = score - slopes[h] * d
        if table is not None:
            score = score + table[h, torch.clamp(d, 0, max_d)]
        return score

    window, sinks = span.window, span.sink_tokens

    def mask_mod(b, h, q_idx, kv_idx):
        d = q_idx + offset - kv_idx
        visible = d >= 0
        if window is not None:
            visible = visible & ((d < window) | (kv_idx < sinks))
        return visible

    return score_mod, mask_mod


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer sizes (the GPU suite uses it)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    from llama_fast.kernels import decode_attention, span_attention

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    dev = torch.device("cuda")
    flex = None
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    except Exception as exc:  # noqa: BLE001
        print(f"FlexAttention unavailable: {exc}")
    copy_bw = copy_bandwidth_gbs()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {args.dtype}, "
          f"copy bandwidth {copy_bw:.0f} GB/s")
    rows = []
    H, Hkv, D = 32, 8, 128

    # ---------------- prefill
    sizes = [(1, 4096), (4, 2048)] if args.quick else [(1, 4096), (4, 2048), (1, 16384)]
    for B, T in sizes:
        q = torch.randn(B, T, H, D, device=dev, dtype=dtype)
        k = torch.randn(B, T, Hkv, D, device=dev, dtype=dtype)
        v = torch.randn(B, T, Hkv, D, device=dev, dtype=dtype)
        qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (B, heads, T, D) for sdpa/flex
        for name, span in spans(H, dev).items():
            flops = 4 * D * H * B * visible_pairs(T, T, span)
            entry = {"phase": "prefill", "B": B, "T": T, "S": T, "span": name}
            entry["ours_ms"] = bench(lambda: span_attention(q, k, v, span))
            if name == "causal":
                entry["sdpa_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                    qh, kh, vh, is_causal=True, enable_gqa=True))
            if flex is not None:
                try:
                    score_mod, mask_mod = flex_fns(span, T, T, H, dev)
                    block_mask = create_block_mask(mask_mod, None, None, T, T, device=dev)
                    entry["flex_ms"] = bench(lambda: flex(qh, kh, vh, score_mod=score_mod, block_mask=block_mask,
                                                          enable_gqa=True))
                except Exception as exc:  # noqa: BLE001
                    entry["flex_error"] = str(exc).splitlines()[0][:100]
            if B * H * T * T * 4 <= 2 ** 31 and name in ("causal", "all"):
                entry["ref_ms"] = bench(lambda: reference.span_attention(q, k, v, span), warmup=1, reps=3)
            for key in ("ours", "sdpa", "flex", "ref"):
                if f"{key}_ms" in entry:
                    entry[f"{key}_tflops"] = flops / (entry[f"{key}_ms"] * 1e-3) / 1e12
            rows.append(entry)
            print(json.dumps(entry))

    # ---------------- decode (Tq = 1), contiguous and paged (block 16)
    configs = [(1, 32768), (16, 4096), (64, 8192)] if not args.quick else [(1, 32768), (32, 4096)]
    for B, S in configs:
        k = torch.randn(B, S, Hkv, D, device=dev, dtype=dtype)
        v = torch.randn(B, S, Hkv, D, device=dev, dtype=dtype)
        page = 16
        kp, vp = k.reshape(B * S // page, page, Hkv, D), v.reshape(B * S // page, page, Hkv, D)
        perm = torch.randperm(B * S // page, device=dev)
        kp, vp = kp[perm].contiguous(), vp[perm].contiguous()
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=dev)
        table = inv.reshape(B, S // page).int()
        q = torch.randn(B, 1, H, D, device=dev, dtype=dtype)
        lens = torch.full((B,), S, dtype=torch.int32, device=dev)
        qh, kh, vh = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        for name, span in spans(H, dev).items():
            keys = visible_pairs(1, S, span)
            bytes_moved = B * (2 * keys * Hkv * D * k.element_size() + 2 * H * D * q.element_size())
            entry = {"phase": "decode", "B": B, "T": 1, "S": S, "span": name}
            # check_bounds=False: what a decode loop whose cache guarantees the bounds runs (no host sync);
            # ours_checked_ms is the default call with its one sync
            entry["ours_ms"] = bench(lambda: decode_attention(q, k, v, lens, span, check_bounds=False))
            entry["ours_checked_ms"] = bench(lambda: decode_attention(q, k, v, lens, span))
            entry["ours_paged_ms"] = bench(lambda: decode_attention(q, kp, vp, lens, span, table, check_bounds=False))
            if name == "causal":
                entry["sdpa_ms"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                    qh, kh, vh, enable_gqa=True))
            if flex is not None:
                try:
                    score_mod, mask_mod = flex_fns(span, 1, S, H, dev)
                    block_mask = create_block_mask(mask_mod, None, None, 1, S, device=dev)
                    entry["flex_ms"] = bench(lambda: flex(qh, kh, vh, score_mod=score_mod, block_mask=block_mask,
                                                          enable_gqa=True))
                except Exception as exc:  # noqa: BLE001
                    entry["flex_error"] = str(exc).splitlines()[0][:100]
            if name in ("causal", "all") and B * S <= 65536:
                entry["ref_ms"] = bench(lambda: reference.decode_attention(q, k, v, lens, span), warmup=1, reps=3)
            for key in ("ours", "ours_checked", "ours_paged", "sdpa", "flex", "ref"):
                if f"{key}_ms" in entry:
                    entry[f"{key}_gbs"] = bytes_moved / (entry[f"{key}_ms"] * 1e-3) / 1e9
                    entry[f"{key}_frac_copy_bw"] = entry[f"{key}_gbs"] / copy_bw
            rows.append(entry)
            print(json.dumps(entry))

    OUT.mkdir(exist_ok=True)
    (OUT / "bench_attention.json").write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(), "dtype": args.dtype, "copy_bw_gbs": copy_bw, "rows": rows}, indent=1))
    print_table(rows, copy_bw)
    return 0


def fmt(x, spec=".0f"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(rows, copy_bw):
    print("\nprefill (TFLOP/s over visible pairs; higher is better)")
    print(f"{'B':>3} {'T':>6} {'span':13} {'ours':>7} {'sdpa':>7} {'flex':>7} {'ref':>7} {'ours/flex':>9}")
    for r in rows:
        if r["phase"] != "prefill":
            continue
        ratio = r["flex_ms"] / r["ours_ms"] if "flex_ms" in r else None
        print(f"{r['B']:>3} {r['T']:>6} {r['span']:13} {fmt(r.get('ours_tflops')):>7} {fmt(r.get('sdpa_tflops')):>7} "
              f"{fmt(r.get('flex_tflops')):>7} {fmt(r.get('ref_tflops'), '.1f'):>7} {fmt(ratio, '.2f'):>9}")
    print(f"\ndecode, Tq=1 (GB/s of K/V read; fraction of the {copy_bw:.0f} GB/s copy bandwidth)")
    print(f"{'B':>3} {'S':>6} {'span':13} {'ours':>7} {'checked':>7} {'paged':>7} {'sdpa':>7} {'flex':>7} {'ref':>7} "
          f"{'ours/copy':>9}")
    for r in rows:
        if r["phase"] != "decode":
            continue
        print(f"{r['B']:>3} {r['S']:>6} {r['span']:13} {fmt(r.get('ours_gbs')):>7} {fmt(r.get('ours_checked_gbs')):>7} "
              f"{fmt(r.get('ours_paged_gbs')):>7} "
              f"{fmt(r.get('sdpa_gbs')):>7} {fmt(r.get('flex_gbs')):>7} {fmt(r.get('ref_gbs'), '.1f'):>7} "
              f"{fmt(r.get('ours_frac_copy_bw'), '.2f'):>9}")


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"bench_attention: {time.time() - t0:.0f} s")
    sys.exit(code)
