"""Micro benchmark of one CPU decode step on the embedded SmolLM2-135M: the eager PyTorch model
(llama_fast's reference path) against a step of the C++ session (llama_fast.session), fp32 and bf16, interleaved
in one run (ratios, not absolute times: shared machines are noisy); plus GB/s of one big matrix-vector
product (the tied embedding as the logits matrix) through torch against the C++ kernel; the kernel
streaming 256 MiB as fp32 and as bf16 against a plain read of it; and the bandwidth floor of a decode step.

    .venv/bin/python benchmarks/bench_decode_step.py [--steps 40] [--context 128] [--json out.json]
    .venv/bin/python benchmarks/bench_decode_step.py --matvec [--shape 1536 576] [--rows 1 8 64 256]
        # the C++ matrix kernels by row count (vectors), on (N, K) weights
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time

import torch

from llama_fast._ext import ext
from llama_fast.bench import interleaved_times, memory_bandwidth
from llama_fast.cache import StaticKVCache
from llama_fast.loaders import load_checkpoint
from llama_fast.model import build_model
from llama_fast.session import SessionRunner, blocks_for_sequence


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def matvec_gbps(weight, repeats=20):
    x = torch.randn(1, weight.shape[1])
    xw = x.to(weight.dtype)
    c = ext()
    times = interleaved_times({"torch": lambda i: torch.nn.functional.linear(xw, weight),
                               "cpp": lambda i: c.cpu_matvec(weight, x)}, repeats)
    nbytes = weight.numel() * weight.element_size()
    return {k: nbytes / min(v) / 1e9 for k, v in times.items()}, {k: statistics.median(v) * 1e3 for k, v in times.items()}


def stream_gbps(nbytes=256 << 20, cols=576, repeats=9):
    """Median GB/s over one buffer far beyond the caches, interleaved: a plain read (torch's sum), and the C++
    matrix-vector kernel over it as fp32 and as bf16 weights (rows of `cols`): how near each kernel streams
    to what reading alone achieves, apart from the rest of a decode step."""
    w32 = torch.ones(nbytes // 4 // cols, cols)
    w16 = w32.view(torch.bfloat16).reshape(-1, cols)  # the same bytes, read as bf16 (all finite)
    x = torch.randn(1, cols)
    c = ext()
    times = interleaved_times({"read": lambda i: w32.sum(), "cpp fp32": lambda i: c.cpu_matvec(w32, x),
                               "cpp bf16": lambda i: c.cpu_matvec(w16, x)}, repeats)
    return {name: w32.numel() * 4 / statistics.median(t) / 1e9 for name, t in times.items()}


MATVEC_ROWS = (1, 2, 4, 8, 11, 12, 16, 32, 64, 128)


def matvec_sweep(isas=("auto",), rows=MATVEC_ROWS, shape=(1536, 576), copies=24, repeats=5):
    """GFLOPS of (rows, K) x (N, K).T: the C++ kernels at each ISA level in `isas` (cpu_matvec: rows streamed
    for up to 2 vectors (AVX-512) or 4, then register blocks of rows x vectors over L2 tiles of rows; one
    summation order in every path) against torch's F.linear, on `copies` weight matrices in turn
    (more than the caches hold, as a model's are), fp32 and bf16 weights; medians, interleaved. Every call
    takes the next copy, whoever makes it: a call never finds its weights in cache from the call before it."""
    c = ext()
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        weights = [torch.randn(shape).to(dtype) for _ in range(copies)]
        calls = itertools.count()
        for n in rows:
            x = torch.randn(n, shape[1])
            xw = x.to(dtype)
            runs = {f"cpp {isa}": lambda i, isa=isa: c.cpu_matvec(weights[next(calls) % copies], x, isa=isa)
                    for isa in isas}
            runs["torch"] = lambda i: torch.nn.functional.linear(xw, weights[next(calls) % copies])
            times = interleaved_times(runs, repeats * copies)
            flops = 2 * n * shape[0] * shape[1]
            out[f"{str(dtype).replace('torch.', '')} {n}"] = {k: flops / statistics.median(v) / 1e9 for k, v in times.items()}
    return out


def bench_dtype(ckpt, dtype, steps, context):
    cfg = ckpt.config
    model = build_model(cfg, ckpt.weights, dtype=dtype)
    prompt = torch.randint(0, cfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    cache = StaticKVCache(cfg.n_layers, 1, context + steps + 8, cfg.n_kv_heads, cfg.head_dim, dtype=dtype)
    model(prompt, cache)
    session = SessionRunner(model, num_blocks=blocks_for_sequence(context + steps + 8, context, 0, 0))
    seq = session.add_sequence()
    session.step([(seq, prompt[0].tolist())])
    tok = torch.tensor([42])
    for _ in range(2):  # warm-up (not timed), keeps both caches at the same length
        model(tok[:, None], cache)
        session.step([(seq, [42])])
    eager, fast = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        model(tok[:, None], cache)
        t1 = time.perf_counter()
        session.step([(seq, [42])])
        t2 = time.perf_counter()
        eager.append((t1 - t0) * 1e3)
        fast.append((t2 - t1) * 1e3)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"weight_bytes": weight_bytes, "isa": session.isa, "threads": session.num_threads}
    for name, ms in (("eager", eager), ("cpp", fast)):
        out[name] = {"ms_p50": statistics.median(ms), "ms_p99": pct(ms, 99), "ms_min": min(ms),
                     "tok_s": 1e3 / statistics.median(ms)}
    out["speedup_p50"] = out["eager"]["ms_p50"] / out["cpp"]["ms_p50"]
    return out, model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--matvec", action="store_true", help="only the sweep of the C++ matrix kernels over row counts")
    ap.add_argument("--isas", nargs="+", default=["auto"],
                    help="the sweep's kernel levels, side by side (e.g. avx512 avx512bf16; default: the best)")
    ap.add_argument("--shape", nargs=2, type=int, default=[1536, 576], metavar=("N", "K"),
                    help="the sweep's weight shape (default: the embedded model's FFN up projection)")
    ap.add_argument("--rows", nargs="+", type=int, default=list(MATVEC_ROWS), help="the sweep's vector counts")
    args = ap.parse_args()
    if args.matvec:
        print(f"{tuple(args.shape)} weights, {torch.get_num_threads()} threads: GFLOPS of C++ cpu_matvec at "
              f"{' / '.join(args.isas)} / torch F.linear")
        for name, r in matvec_sweep(args.isas, args.rows, tuple(args.shape)).items():
            print(f"{name:>14} rows: " + " / ".join(f"{v:6.1f}" for v in r.values()))
        timing = ext().cpu_bf16_timing()
        if timing is not None:  # what `auto` weighs to pick avx512bf16 or avx512vnni
            print(f"one vdpbf16ps {timing['dot_ns']:.3f} ns, one 16-lane FMA {timing['fma_ns']:.3f} ns")
        return
    ckpt = load_checkpoint("smollm2-135m-instruct", progress=False)
    measured = memory_bandwidth(torch.get_num_threads())
    bw, read_bw = measured["copy"] / 1e9, measured["read"] / 1e9
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "torch_threads": torch.get_num_threads(), "copy_GBps": bw, "read_GBps": read_bw, "context": args.context,
              "dtypes": {}}
    print(f"copy bandwidth {bw:.1f} GB/s, read {read_bw:.1f} GB/s, {torch.get_num_threads()} threads, "
          f"context {args.context}")
    stream = result["stream_GBps"] = stream_gbps()
    print(f"streaming 256 MiB (median GB/s): plain read {stream['read']:.1f}, C++ matvec fp32 {stream['cpp fp32']:.1f} "
          f"({100 * stream['cpp fp32'] / stream['read']:.0f}%), bf16 {stream['cpp bf16']:.1f} "
          f"({100 * stream['cpp bf16'] / stream['read']:.0f}%)")
    for dtype in (torch.float32, torch.bfloat16):
        r, model = bench_dtype(ckpt, dtype, args.steps, args.context)
        gbps, mv_ms = matvec_gbps(model.tok_embeddings.weight.detach())
        r["matvec_GBps"], r["matvec_ms"] = gbps, mv_ms
        r["floor_ms"] = r["weight_bytes"] / (bw * 1e9) * 1e3
        r["cpp_fraction_of_floor"] = r["floor_ms"] / r["cpp"]["ms_p50"]
        r["cpp_GBps"] = r["weight_bytes"] / r["cpp"]["ms_p50"] / 1e6  # the step's weights per second
        result["dtypes"][str(dtype).replace("torch.", "")] = r
        print(f"{str(dtype):15s} eager {r['eager']['ms_p50']:7.1f} ms/token ({r['eager']['tok_s']:5.1f} tok/s)   "
              f"C++ {r['cpp']['ms_p50']:6.1f} ms/token ({r['cpp']['tok_s']:5.1f} tok/s, p99 {r['cpp']['ms_p99']:.1f}, "
              f"min {r['cpp']['ms_min']:.1f})   x{r['speedup_p50']:.2f}   floor {r['floor_ms']:.1f} ms "
              f"({100 * r['cpp_fraction_of_floor']:.0f}%); the step reads {r['cpp_GBps']:.1f} GB/s of weights "
              f"({100 * r['cpp_GBps'] / stream['read']:.0f}% of the streaming plain read)")
        print(f"{'':15s} logits matvec {tuple(model.tok_embeddings.weight.shape)}: torch {gbps['torch']:.1f} GB/s "
              f"({mv_ms['torch']:.2f} ms), C++ {gbps['cpp']:.1f} GB/s ({mv_ms['cpp']:.2f} ms)")
        del model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
