#!/usr/bin/env python3
"""GPU correctness of the Triton kernels (needs CUDA): fp16, bf16 and fp32 against the fp64 reference.

The interpreter tests (tests/test_kernels_*.py) cover fp32/fp16 on CPU; this covers what only a GPU can:
bf16, the compiled kernels themselves, and larger shapes (T, S up to 2048, decode over 8192 keys, int8 /
int4 weight-only matmuls up to 4096 x 4096). The bar is the tests' one: error vs the fp64 reference <= 2x
the reference's own error at the kernel's dtype, plus a floor at fp32 rounding. Outputs are NaN-poisoned
before each call. Prints one line per case and a summary; exits 1 on any failure.
Run: python benchmarks/gpu_correctness.py [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from llama_fast import reference
from llama_fast.span import SpanBias, alibi_slopes


def make_span(name, H, device):
    g = torch.Generator().manual_seed(H)
    buckets = torch.randn(H, 32, generator=g).to(device)
    return {
        "none": SpanBias(),
        "alibi": SpanBias(alibi_slopes=alibi_slopes(H).to(device)),
        "buckets": SpanBias(bucket_bias=buckets, max_distance=128),
        "window": SpanBias(window=256),
        "window_sinks": SpanBias(window=256, sink_tokens=4),
        "softcap": SpanBias(logit_softcap=20.0),
        "all": SpanBias(alibi_slopes=alibi_slopes(H).to(device), bucket_bias=buckets, max_distance=128, window=300,
                        sink_tokens=4, logit_softcap=20.0),
    }[name]


def compare(out, ref_fn, inputs):
    if torch.isnan(out).any():
        return False, float("nan"), float("nan")
    ref64 = ref_fn(*[x.double() for x in inputs])
    ref_lo = ref_fn(*inputs)
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_lo.double() - ref64).abs().max().item()
    floor = 1e-6 * max(1.0, ref64.abs().max().item())
    return err <= 2 * ref_err + floor, err, ref_err


def compare_linear(out, x, w64):
    """out against x @ w64.T in fp64; the bar is compare()'s, the reference here being F.linear at x's dtype
    with the (dequantized) weights rounded to that dtype, as a model holding them dequantized would run."""
    if torch.isnan(out).any():
        return False, float("nan"), float("nan")
    ref64 = x.double() @ w64.T
    ref_lo = torch.nn.functional.linear(x, w64.to(x.dtype))
    err = (out.double() - ref64).abs().max().item()
    ref_err = (ref_lo.double() - ref64).abs().max().item()
    floor = 1e-6 * max(1.0, ref64.abs().max().item())
    return err <= 2 * ref_err + floor, err, ref_err


def quant_cases(dtype, dev, quick, smoke):
    """int8 and int4 (groups of 32 and 128) weight-only matmuls: decode (M = 1) and the GEMM tiles, an odd N
    whose matrix-vector launch splits K, outputs NaN-poisoned."""
    import importlib

    from llama_fast.kernels import (dequantize_int4, dequantize_int8, int4_matmul, int8_matmul, quantize_int4,
                                    quantize_int8)

    importlib.import_module("llama_fast.kernels.quant_matmul").POISON = True
    shapes = [(33, 256)] if smoke else [(1001, 4096)] if quick else [(4096, 4096), (1001, 4096)]  # (N, K)
    results = []
    for N, K in shapes:
        w = torch.randn(N, K, device=dev) * 0.02
        q8 = quantize_int8(w)
        kinds = {"int8": (lambda x: int8_matmul(x, *q8), dequantize_int8(*q8, dtype=torch.float64))}
        for g in (32, 128):
            q4 = quantize_int4(w, g)
            kinds[f"int4 g{g}"] = (lambda x, q4=q4, g=g: int4_matmul(x, *q4, g),
                                   dequantize_int4(*q4, g, dtype=torch.float64))
        for M in (1, 7, 300) if not smoke else (1, 7, 70):
            x = torch.randn(M, K, device=dev, dtype=dtype)
            for name, (fn, w64) in kinds.items():
                ok, err, rerr = compare_linear(fn(x), x, w64)
                results.append((f"{name} {str(dtype)[6:]} M{M} N{N} K{K}", ok, err, rerr))
    return results


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, fp32/fp16, CPU tensors under TRITON_INTERPRET=1: checks this script itself")
    args = parser.parse_args()
    if args.smoke:
        import os

        assert os.environ.get("TRITON_INTERPRET") == "1", "--smoke runs in the interpreter: set TRITON_INTERPRET=1"
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_correctness: no CUDA device", file=sys.stderr)
        return 2
    else:
        dev = torch.device("cuda")
    from llama_fast.kernels import apply_rope, decode_attention, rms_norm, span_attention, swiglu

    torch.manual_seed(0)
    results = []
    t0 = time.time()
    spans = ["none", "alibi", "buckets", "window", "window_sinks", "softcap", "all"]
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if not args.smoke else [torch.float16, torch.float32]
    shapes = [(1, 1), (17, 100), (300, 300), (1000, 1000), (128, 2048)] if not args.quick else [(17, 100), (300, 300)]
    if args.smoke:
        shapes = [(1, 1), (17, 100)]
    for dtype in dtypes:
        for D in (64, 80, 96, 128):
            for i, span_name in enumerate(spans):
                T, S = shapes[(i + D) % len(shapes)]
                G = (1, 3, 4)[(i + D // 16) % 3]
                Hkv = 2
                H = Hkv * G
                span = make_span(span_name, H, dev)
                q = torch.randn(2, T, H, D, device=dev, dtype=dtype)
                k = torch.randn(2, S, Hkv, D, device=dev, dtype=dtype)
                v = torch.randn(2, S, Hkv, D, device=dev, dtype=dtype)
                out = torch.full_like(q, float("nan"))
                span_attention(q, k, v, span, out=out)
                ok, err, rerr = compare(out, lambda q, k, v: reference.span_attention(q, k, v, span), (q, k, v))
                results.append((f"prefill {str(dtype)[6:]} D{D} {span_name} T{T} S{S} G{G}", ok, err, rerr))
        # varlen
        lengths = [1, 17, 300, 1000] if not args.smoke else [1, 17, 40]
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
        for span_name in ("none", "all"):
            q = torch.randn(sum(lengths), 8, 128, device=dev, dtype=dtype)
            k, v = (torch.randn(sum(lengths), 2, 128, device=dev, dtype=dtype) for _ in range(2))
            span = make_span(span_name, 8, dev)
            out = torch.full_like(q, float("nan"))
            span_attention(q, k, v, span, cu_seqlens=cu, out=out)
            ok, err, rerr = compare(out, lambda q, k, v: reference.span_attention(q, k, v, span, cu_seqlens=cu),
                                    (q, k, v))
            results.append((f"varlen {str(dtype)[6:]} D128 {span_name}", ok, err, rerr))
        # decode: contiguous and paged (block 16 and 32, shuffled), Tq 1 / 4 / 200 (prompt), splits chosen
        for layout in (None, 16, 32):
            for Tq in (1, 4, 200) if not args.smoke else (1, 4, 40):
                for span_name in ("none", "window_sinks", "all"):
                    B, Hkv, G, D, S_max = 4, 2, 4, 128, 8192 if not args.quick else 2048
                    if args.smoke:
                        S_max = 256
                    H = Hkv * G
                    lengths = torch.tensor([S_max, Tq, S_max // 3, 777], dtype=torch.int32, device=dev).clamp(min=Tq, max=S_max)
                    if layout is None:
                        kc = torch.randn(B, S_max, Hkv, D, device=dev, dtype=dtype)
                        vc = torch.randn(B, S_max, Hkv, D, device=dev, dtype=dtype)
                        table = None
                    else:
                        per_row = S_max // layout
                        nb = B * per_row + 7
                        kc = torch.randn(nb, layout, Hkv, D, device=dev, dtype=dtype)
                        vc = torch.randn(nb, layout, Hkv, D, device=dev, dtype=dtype)
                        table = torch.randperm(nb, device=dev)[: B * per_row].reshape(B, per_row).int()
                    q = torch.randn(B, Tq, H, D, device=dev, dtype=dtype)
                    span = make_span(span_name, H, dev)
                    out = torch.full_like(q, float("nan"))
                    decode_attention(q, kc, vc, lengths, span, table, out=out)
                    ok, err, rerr = compare(
                        out, lambda q, k, v: reference.decode_attention(q, k, v, lengths, span, table), (q, kc, vc))
                    results.append((f"decode {str(dtype)[6:]} {'paged' + str(layout) if layout else 'contig'} "
                                    f"Tq{Tq} {span_name}", ok, err, rerr))
        # elementwise ops
        x = torch.randn(64, 4096 if not args.smoke else 256, device=dev, dtype=dtype)
        w = torch.randn(x.shape[1], device=dev, dtype=dtype)
        r = torch.randn_like(x)
        y, nr = rms_norm(x, w, 1e-6, r)
        yr, nrr = reference.rms_norm(x, w, 1e-6, r)
        tol = torch.finfo(dtype).eps * 2 * yr.abs().max().item()
        results.append((f"rms_norm {str(dtype)[6:]}", (y - yr).abs().max().item() <= tol and torch.equal(nr, nrr),
                        (y - yr).abs().max().item(), tol))
        g, u = torch.randn(64, 11008, device=dev, dtype=dtype), torch.randn(64, 11008, device=dev, dtype=dtype)
        s, sr = swiglu(g, u), reference.swiglu(g, u)
        tol = torch.finfo(dtype).eps * 2 * sr.abs().max().item()
        results.append((f"swiglu {str(dtype)[6:]}", (s - sr).abs().max().item() <= tol, (s - sr).abs().max().item(), tol))
        cs = reference.rope_cos_sin_cache(4096, 128, 500000.0).to(dev)
        pos = torch.randint(0, 4096, (4, 64), device=dev)
        q = torch.randn(4, 64, 32, 128, device=dev, dtype=dtype)
        k = torch.randn(4, 64, 8, 128, device=dev, dtype=dtype)
        q2, k2 = q.clone(), k.clone()
        apply_rope(q, k, pos, cs)
        reference.apply_rope(q2, k2, pos, cs)
        e = max((q - q2).abs().max().item(), (k - k2).abs().max().item())
        tol = torch.finfo(dtype).eps * 2 * q2.abs().max().item()
        results.append((f"rope {str(dtype)[6:]}", e <= tol, e, tol))
        results += quant_cases(dtype, dev, args.quick, args.smoke)
    failures = [r for r in results if not r[1]]
    for name, ok, err, rerr in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name:50} err {err:.3g} (bar from {rerr:.3g})")
    print(f"gpu_correctness: {len(results)} cases, {len(failures)} failures, {time.time() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
