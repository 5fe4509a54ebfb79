"""Engine benchmark: an arrival trace through llama_fast's continuous-batching Engine, in-process, with and
without chunked prefill and prefix caching.

The trace: --requests requests arriving as a Poisson process at --rate requests/s (a fixed seed), each
with a prompt and output length drawn from a fixed mix; half the prompts start with one shared 256-token
system prompt (what prefix caching is for). Prompts are windows of the Shakespeare text, greedy, EOS
ignored (every request produces exactly its output length). Each configuration replays the same trace
on the embedded model. Reported per configuration: request throughput, output tokens/s, time to first
token and inter-token latency percentiles (p50, p99), end-to-end latency, prompt tokens computed and taken
from the cache, preemptions.

    .venv/bin/python benchmarks/bench_engine.py [--requests 48] [--rate 1.5] [--threads 2]
        [--dtype float32] [--max-batch-tokens 256] [--churn 2000] [--out benchmarks/out]

Writes bench_engine.json into --out; paste the printed table into RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

import torch

from llama_fast import LLM, Engine
from llama_fast.bench import rss_bytes
from llama_fast.paths import SAMPLE_TEXT

PROMPT_MIX = [(32, 0.3), (128, 0.3), (512, 0.3), (1024, 0.1)]  # (prompt tokens, share of requests)
OUTPUT_MIX = [(16, 0.3), (64, 0.5), (128, 0.2)]
SYSTEM_TOKENS = 256
CONFIGS = [("chunked + prefix cache", True, True), ("chunked", True, False), ("prefix cache", False, True),
           ("neither", False, False)]


def trace(llm: LLM, requests: int, rate: float, seed: int = 0) -> list[tuple[float, list[int], int]]:
    """(arrival time in s, prompt ids, output tokens) per request, arrivals a Poisson process."""
    rng = random.Random(seed)
    with open(SAMPLE_TEXT, encoding="utf-8") as f:
        text = llm.tokenizer.encode(f.read())
    system = text[:SYSTEM_TOKENS]
    pick = lambda mix: rng.choices([v for v, _ in mix], weights=[w for _, w in mix])[0]  # noqa: E731
    out, t = [], 0.0
    for _ in range(requests):
        t += rng.expovariate(rate)
        n = pick(PROMPT_MIX)
        start = rng.randrange(SYSTEM_TOKENS, len(text) - n)
        prompt = text[start:start + n]
        if rng.random() < 0.5 and n > SYSTEM_TOKENS // 4:
            prompt = system + prompt[:max(1, n - SYSTEM_TOKENS)]
        out.append((t, prompt, pick(OUTPUT_MIX)))
    return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def replay(engine: Engine, requests: list[tuple[float, list[int], int]]) -> dict:
    """Adds each request when its arrival time has passed, steps the engine meanwhile; per request the
    arrival, the time of each token and the end."""
    start = time.perf_counter()
    arrival, stamps, done = {}, {}, {}
    pending = list(requests)
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            at, prompt, new = pending.pop(0)
            rid = engine.add_request(prompt, max_new_tokens=new, ignore_eos=True)
            arrival[rid], stamps[rid] = at, []
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        outputs = engine.step()
        now = time.perf_counter() - start
        for out in outputs:
            stamps[out.request_id] += [now] * len(out.new_token_ids)
            if out.finish_reason is not None:
                done[out.request_id] = now
    wall = time.perf_counter() - start
    ttft = [stamps[r][0] - arrival[r] for r in arrival]
    itl = [b - a for r in arrival for a, b in zip(stamps[r], stamps[r][1:])]
    e2e = [done[r] - arrival[r] for r in arrival]
    tokens = sum(len(s) for s in stamps.values())
    stats = engine.stats()
    return {
        "seconds": wall, "requests_per_s": len(arrival) / wall, "output_tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
        "itl_p50_ms": 1000 * percentile(itl, 50), "itl_p99_ms": 1000 * percentile(itl, 99),
        "e2e_p50_s": percentile(e2e, 50), "e2e_p99_s": percentile(e2e, 99),
        "prompt_tokens_computed": stats["prompt_tokens_computed"], "prompt_tokens_cached": stats["prompt_tokens_cached"],
        "preemptions": stats["preemptions"],
    }


def churn(llm: LLM, requests: int, seed: int = 1) -> dict:
    """Many short requests through a 64-block pool, one in twenty aborted at a random later step."""
    rng = random.Random(seed)
    with open(SAMPLE_TEXT, encoding="utf-8") as f:
        text = llm.tokenizer.encode(f.read())
    engine = Engine(llm, max_kv_tokens=64 * 16, max_batch_tokens=128, max_running=32)
    live, aborted, rss = set(), 0, []
    start = time.perf_counter()
    for i in range(requests):
        n = rng.randrange(1, 60)
        at = rng.randrange(0, len(text) - n)
        live.add(engine.add_request(text[at:at + n], max_new_tokens=rng.randrange(1, 24), ignore_eos=True))
        if i % 4 == 3:
            live -= {out.request_id for out in engine.step() if out.finish_reason is not None}
            if rng.random() < 0.2 and live:
                engine.abort(rng.choice(sorted(live)))
                aborted += 1
        if i == requests // 5:
            rss.append(rss_bytes() / 2**20)
    while engine.has_unfinished():
        engine.step()
    rss.append(rss_bytes() / 2**20)
    stats = engine.stats()
    return {"requests": requests, "aborted": aborted, "seconds": time.perf_counter() - start,
            "blocks_in_use_after": stats["blocks_in_use"], "preemptions": stats["preemptions"],
            "rss_growth_mib": rss[1] - rss[0]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=1.5, help="mean arrivals per second (Poisson)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-batch-tokens", type=int, default=256)
    ap.add_argument("--churn", type=int, default=2000, help="requests of the churn run (0: skip it)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    llm = LLM.from_pretrained("smollm2-135m-instruct", dtype=getattr(torch, args.dtype), progress=False)
    requests = trace(llm, args.requests, args.rate)
    warm = Engine(llm)  # first-call costs (weights paged in, workspaces) before any timing
    warm.add_request(requests[0][1], max_new_tokens=2)
    while warm.has_unfinished():
        warm.step()
    results = {}
    for name, chunked, cached in CONFIGS:
        engine = Engine(llm, max_batch_tokens=args.max_batch_tokens, prefix_caching=cached, chunked_prefill=chunked)
        results[name] = replay(engine, requests)
        print(f"{name}: {json.dumps({k: round(v, 3) for k, v in results[name].items()})}", flush=True)
    churned = churn(llm, args.churn) if args.churn else None
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "isa": warm.runner.isa, "threads": args.threads, "dtype": args.dtype, "requests": args.requests,
              "rate": args.rate, "max_batch_tokens": args.max_batch_tokens, "results": results,
              "churn": churned}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_engine.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{args.requests} requests, Poisson {args.rate}/s, {args.dtype}, {args.threads} threads, isa {report['isa']}, "
          f"max_batch_tokens {args.max_batch_tokens}\n")
    print("| config | req/s | out tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | e2e p50 / p99 s | prompt computed / cached | preemptions |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} / "
              f"{r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.0f} / {r['itl_p99_ms']:.0f} | {r['e2e_p50_s']:.2f} / "
              f"{r['e2e_p99_s']:.2f} | {r['prompt_tokens_computed']} / {r['prompt_tokens_cached']} | {r['preemptions']} |")

    if churned:
        print(f"\nchurn: {churned['requests']} requests ({churned['aborted']} aborted) in {churned['seconds']:.0f} s, "
              f"{churned['preemptions']} preemptions; blocks in use after: {churned['blocks_in_use_after']}, "
              f"RSS growth {churned['rss_growth_mib']:.1f} MiB")


if __name__ == "__main__":
    main()
