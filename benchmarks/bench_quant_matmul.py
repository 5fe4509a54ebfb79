#!/usr/bin/env python3
"""Weight-only int8 / int4 matmuls (kernels/quant_matmul.py) on a GPU against torch's bf16 F.linear.

Llama-7B projection shapes, N x K: 4096 x 4096 (attention), 11008 x 4096 (gate / up), 4096 x 11008 (down),
at M = 1 (decode: the matrix-vector kernels) and M = 128 (prefill: the GEMM tiles), bf16 activations.
Times are medians of CUDA-graph replays, as the engine's decode steps run (no Python launch cost in them).
Reports GB/s of everything read and written (weights with their scales and zeros, x, y), that as a
fraction of this GPU's device-to-device copy bandwidth, and the speed-up over bf16 F.linear (its time /
ours). Each timed output is also checked against F.linear on the dequantized weights (max relative error).

Writes benchmarks/out/bench_quant_matmul.json and prints a table. Needs CUDA; --smoke runs tiny sizes in
fp32 on CPU tensors under TRITON_INTERPRET=1 (wall-clock times, nothing written): it checks this script.
Run: python benchmarks/bench_quant_matmul.py [--quick] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

OUT = Path(__file__).resolve().parent / "out"
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K)


def graph_ms(fn, calls=20, reps=10) -> float:
    """Median milliseconds of one fn() when `calls` of them replay as one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def wall_ms(fn, reps=3) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (graph_ms(lambda: dst.copy_(src), calls=3, reps=5) * 1e-3) / 1e9


def methods(w: torch.Tensor, dtype: torch.dtype) -> dict:
    """name -> (fn(x), weight bytes read, dequantized weights for the check)."""
    from llama_fast.kernels import (dequantize_int4, dequantize_int8, int4_matmul, int8_matmul, quantize_int4,
                                    quantize_int8)

    N, K = w.shape
    dense = w.to(dtype)
    out = {"F.linear": (lambda x: F.linear(x, dense), dense.numel() * dense.element_size(), dense)}
    qweight, scales = quantize_int8(w)
    out["int8"] = (lambda x: int8_matmul(x, qweight, scales), N * K + 4 * N, dequantize_int8(qweight, scales))
    for g in (128, 32):
        packed, s, z = quantize_int4(w, g)
        out[f"int4 g{g}"] = (lambda x, p=packed, s=s, z=z, g=g: int4_matmul(x, p, s, z, g),
                             N * K // 2 + 4 * N * K // g, dequantize_int4(packed, s, z, g))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the 4096 x 4096 shape")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU tensors under TRITON_INTERPRET=1")
    args = parser.parse_args()
    if args.smoke:
        assert os.environ.get("TRITON_INTERPRET") == "1", "--smoke runs in the interpreter: set TRITON_INTERPRET=1"
        dev, dtype, timer, copy_bw = torch.device("cpu"), torch.float32, wall_ms, None
        shapes, rows_m = [(33, 256)], (1, 3)
    elif not torch.cuda.is_available():
        print("bench_quant_matmul: no CUDA device", file=sys.stderr)
        return 2
    else:
        dev, dtype, timer, copy_bw = torch.device("cuda"), torch.bfloat16, graph_ms, copy_bandwidth_gbs()
        shapes, rows_m = (SHAPES[:1] if args.quick else SHAPES), (1, 128)
    torch.manual_seed(0)
    rows = []
    for N, K in shapes:
        w = torch.randn(N, K, device=dev) * 0.02
        for M in rows_m:
            x = torch.randn(M, K, device=dev, dtype=dtype)
            io_bytes = (M * K + M * N) * x.element_size()
            base_ms = None
            for name, (fn, weight_bytes, deq) in methods(w, dtype).items():
                ms = timer(lambda: fn(x))
                base_ms = base_ms or ms
                want = F.linear(x.float(), deq.float())
                err = ((fn(x).float() - want).abs().max() / want.abs().max()).item()
                gbs = (weight_bytes + io_bytes) / (ms * 1e-3) / 1e9
                rows.append(dict(M=M, N=N, K=K, method=name, us=ms * 1e3, gbs=gbs, speedup=base_ms / ms, rel_err=err,
                                 frac_copy_bw=gbs / copy_bw if copy_bw else None))
    print_table(rows, copy_bw)
    if not args.smoke:
        OUT.mkdir(exist_ok=True)
        (OUT / "bench_quant_matmul.json").write_text(json.dumps(
            {"gpu": torch.cuda.get_device_name(), "copy_bw_gbs": copy_bw, "rows": rows}, indent=1))
    return 0


def print_table(rows, copy_bw):
    bw = f"; copy bandwidth {copy_bw:.0f} GB/s" if copy_bw else ""
    print(f"\nweight-only matmuls vs F.linear (us per call, GB/s moved{bw}; speed-up = F.linear time / ours)")
    print(f"{'M':>4} {'N':>6} {'K':>6} {'method':10} {'us':>9} {'GB/s':>7} {'/copy':>6} {'speed-up':>8} {'rel err':>8}")
    for r in rows:
        frac = f"{r['frac_copy_bw']:.2f}" if r["frac_copy_bw"] is not None else "-"
        print(f"{r['M']:>4} {r['N']:>6} {r['K']:>6} {r['method']:10} {r['us']:>9.1f} {r['gbs']:>7.0f} {frac:>6} "
              f"{r['speedup']:>8.2f} {r['rel_err']:>8.1e}")


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"bench_quant_matmul: {time.time() - t0:.0f} s")
    sys.exit(code)
