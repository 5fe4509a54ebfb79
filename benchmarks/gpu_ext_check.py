"""GPU check of the extension's CUDA code (llama_fast._C built with CUDA): the sampler and the KV cache
writes / block copies on CUDA tensors against the CPU implementation and the reference, then the CUDA
sampler's speed against the eager-PyTorch sampler. Part of benchmarks/gpu_suite.sh.

    python benchmarks/gpu_ext_check.py            # on a GPU machine (exit 1 on a failed check)
    python benchmarks/gpu_ext_check.py --smoke    # the same checks on CPU tensors (tests this script)
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from llama_fast import PagedKVCache, SamplingParams, StaticKVCache, ops, reference
from llama_fast._ext import ext

FAILS: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {name} {detail}")
    if not ok:
        FAILS.append(name)


def chi2_ok(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[bool, str]:
    n = tokens.numel()
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    if counts[probs == 0].sum() > 0:
        return False, f"{int(counts[probs == 0].sum())} draws outside the support"
    expect = probs * n
    big = expect >= 5
    obs, exp = counts[big].tolist(), expect[big].tolist()
    rest = ~big & (probs > 0)
    if rest.any():
        obs.append(counts[rest].sum().item())
        exp.append(expect[rest].sum().item())
    df = max(len(obs) - 1, 1)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    h = 2.0 / (9.0 * df)
    crit = df * (1.0 - h + 4.753424 * math.sqrt(h)) ** 3
    return stat < crit, f"chi2 {stat:.1f} < {crit:.1f}"


def sampler_checks(dev: torch.device) -> None:
    print(f"sampler on {dev}")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        logits = (torch.randn(16, 49152, generator=g) * 3).to(dtype)
        logits[1, 100] = logits[1, 200] = 1000  # a tie: the lower id
        got = ops.sample(logits.to(dev), SamplingParams(temperature=0)).cpu()
        check(f"greedy {dtype}", torch.equal(got, logits.float().argmax(-1)))
        got = ops.sample(logits.to(dev), SamplingParams(temperature=0.7, top_k=1, seed=3)).cpu()
        check(f"top_k=1 {dtype}", torch.equal(got, logits.float().argmax(-1)))
    row = torch.randn(64, generator=g)
    seen = torch.zeros(64, dtype=torch.int32)
    seen[:10] = 2
    cases = {
        "temperature": SamplingParams(temperature=0.7, seed=1),
        "top_k": SamplingParams(top_k=10, seed=2),
        "top_p": SamplingParams(top_p=0.8, seed=3),
        "min_p": SamplingParams(min_p=0.1, seed=4),
        "combined": SamplingParams(temperature=1.3, top_k=20, top_p=0.9, min_p=0.05, seed=5),
        "penalties": SamplingParams(temperature=0.9, top_p=0.95, repetition_penalty=1.3, presence_penalty=0.2,
                                    frequency_penalty=0.1, seed=6),
    }
    n = 20000
    for name, p in cases.items():
        s = seen[None].expand(n, 64).to(dev) if p.has_penalties else None
        tokens = ops.sample(row[None].expand(n, 64).to(dev), p, step=torch.arange(n), seen=s)
        r = reference.apply_penalties(row, seen, p) if p.has_penalties else row
        ok, detail = chi2_ok(tokens, reference.filtered_probs(r, p).double())
        check(f"distribution {name}", ok, detail)
    # A row's draw does not depend on the batch.
    logits = torch.randn(12, 5000, generator=g).to(dev)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=b) for b in range(12)]
    together = ops.sample(logits, params, step=5).cpu()
    alone = torch.cat([ops.sample(logits[b:b + 1], params[b], step=5).cpu() for b in range(12)])
    check("batch independence", torch.equal(together, alone))
    bad = torch.randn(3, 100).to(dev)
    bad[1, 5] = float("nan")
    try:
        ops.sample(bad, SamplingParams(seed=0))
        check("NaN row raises", False)
    except ValueError as err:
        check("NaN row raises", "rows [1]" in str(err))
    tokens, lp = ops.sample(logits, params, logprobs=True)
    want = torch.log_softmax(logits.double(), -1).gather(1, tokens[:, None].to(dev))[:, 0].cpu()
    check("logprobs", torch.allclose(lp.double().cpu(), want, atol=1e-4))


def cache_checks(dev: torch.device) -> None:
    print(f"KV caches on {dev}")
    for dtype in (torch.float32, torch.float16):
        L, H, D = 2, 3, 64
        paged = PagedKVCache(L, 32, 8, H, D, dtype=dtype, device=dev)
        static = StaticKVCache(L, 2, 64, H, D, dtype=dtype, device=dev)
        a, b = paged.add_sequence(), paged.add_sequence()
        ref = {a: [], b: []}
        for T in (11, 1, 1, 5):
            k = torch.randn(L, 2, T, H, D).to(dev, dtype)
            paged.append([a, b], k, -k)
            static.append(k, -k)
            ref[a].append(k[0, 0])
            ref[b].append(k[0, 1])
        kid = paged.fork(a)
        k = torch.randn(L, 2, 3, H, D).to(dev, dtype)
        paged.append([a, kid], k, -k)
        ok = True
        for s, parts in ((b, ref[b]), (kid, ref[a] + [k[0, 1]]), (a, ref[a] + [k[0, 0]])):
            gk, gv = paged.gather(s, 0)
            want = torch.cat(parts)
            ok &= torch.equal(gk, want) and torch.equal(gv, -want)
        check(f"paged write/fork/gather {dtype}", ok)
        n = int(static.seqlens[1])
        check(f"static write {dtype}", torch.equal(static.k[0][1, :n], torch.cat(ref[b])))


def bench(dev: torch.device, quick: bool) -> None:
    print(f"sampler speed on {dev} (temperature 0.8, top_p 0.95)")
    print("| B | V | ext ms | eager batched ms | ratio |")
    print("|---|---|---|---|---|")
    from bench_sampling import PARAMS, torch_batched  # noqa: E402  (same folder)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for B in (1, 8, 64):
        for V in ((32000,) if quick else (32000, 49152, 128256)):
            logits = (torch.randn(B, V) * 3).to(dev)
            gen = torch.Generator(device=dev).manual_seed(0)
            fns = {"ext": lambda: ops.sample(logits, PARAMS, step=1),
                   "eager": lambda: torch_batched(logits, PARAMS, gen)}
            t = {}
            for name, fn in fns.items():
                fn()
                sync()
                reps = 20
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                sync()
                t[name] = (time.perf_counter() - t0) / reps * 1e3
            print(f"| {B} | {V} | {t['ext']:.3f} | {t['eager']:.3f} | {t['eager'] / t['ext']:.1f}x |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="run on CPU tensors (checks the script itself)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        dev = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("no CUDA device")
            return 1
        if not ext().with_cuda:
            print("llama_fast._C was built without CUDA")
            return 1
        dev = torch.device("cuda")
    sampler_checks(dev)
    cache_checks(dev)
    bench(dev, args.quick or args.smoke)
    print("gpu_ext_check:", "FAILED " + ", ".join(FAILS) if FAILS else "all checks passed")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
    sys.exit(main())
