"""Serving benchmark: `llama-fast serve` against llama.cpp's `llama-server` on the same GGUF at the same
precision, in one run, with the measures of vLLM's benchmark_serving.

Workloads: closed loop at each concurrency (1, 4, 8, 16: that many clients, each sending its next request
when the last one ended) and an open loop (requests arriving as a Poisson process at --rate per second).
Prompts are token ids cut from the sample text, prompt and output lengths drawn from a fixed mix with a
fixed seed, so both servers get the same requests; greedy, EOS ignored (every request produces its output
length), streamed. Per run: request throughput, output tokens/s, time to first token (TTFT), inter-token
latency (ITL: the gaps between streamed tokens) and end-to-end latency, each p50 and p99. Also the
per-token time of one sequence decoding in-process (what `llama-fast generate` runs), the bar for ITL at
concurrency 1.

    .venv/bin/python benchmarks/bench_serving.py [--quick] [--dtype float32|bfloat16] [--threads 2]
        [--concurrency 1 4 8 16] [--rate 2] [--requests 32] [--no-llama-cpp] [--out benchmarks/out]

Writes bench_serving.json and bench_serving.png into --out.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import httpx

from llama_fast.bench import free_port, gguf_copy
from llama_fast.paths import SAMPLE_TEXT
from llama_fast.tokenizer import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_cpp_bin  # noqa: E402  (benchmarks/ is on sys.path only now)

GGUF_TYPE = {"float32": "F32", "bfloat16": "BF16"}
# (prompt lengths, output lengths) each request draws one of, uniformly: full and --quick.
MIX = {"full": ((64, 128, 256, 512), (64, 128, 256)), "quick": ((32, 64, 128), (16, 32, 64))}


def workload(tokenizer: Tokenizer, count: int, mix, seed: int = 0) -> list[tuple[list[int], int]]:
    """`count` (prompt token ids, output length) pairs: windows of the sample text at random offsets."""
    with open(SAMPLE_TEXT, encoding="utf-8") as f:
        text_ids = tokenizer.encode(f.read(), add_bos=False)
    rng = random.Random(seed)
    requests = []
    for _ in range(count):
        length, output = rng.choice(mix[0]), rng.choice(mix[1])
        start = rng.randrange(len(text_ids) - length)
        requests.append((text_ids[start:start + length], output))
    return requests


async def one_request(http: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> dict:
    """One streamed completion: when each token came, and how many there were (the usage's count)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, tokens = [], None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    if not arrivals:
        raise RuntimeError("a request streamed no text")
    return {"ttft": arrivals[0] - start, "itl": [b - a for a, b in zip(arrivals, arrivals[1:])], "e2e": end - start,
            "tokens": tokens if tokens is not None else len(arrivals)}


def fresh_connections(most: int | None) -> httpx.Limits:
    """A new connection per request: llama-server closes idle keep-alive connections, and a request sent on
    one it just closed fails ("Server disconnected without sending a response")."""
    return httpx.Limits(max_connections=most, max_keepalive_connections=0)


async def closed_loop(url: str, model: str, requests, concurrency: int) -> tuple[list[dict], float]:
    """`concurrency` clients, each sending its next request as soon as its last one ended."""
    pending = list(reversed(requests))
    results = []

    async def client(http):
        while pending:
            prompt, output = pending.pop()
            results.append(await one_request(http, model, prompt, output))

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=fresh_connections(concurrency)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return results, time.perf_counter() - start


async def open_loop(url: str, model: str, requests, rate: float, seed: int = 1) -> tuple[list[dict], float]:
    """Requests arriving as a Poisson process of `rate` per second, whatever is still running."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=fresh_connections(None)) as http:
        start = time.perf_counter()
        tasks = []
        for prompt, output in requests:
            tasks.append(asyncio.create_task(one_request(http, model, prompt, output)))
            await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summary(results: list[dict], seconds: float) -> dict:
    def pct(values, q):
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]

    ttft, e2e = [r["ttft"] for r in results], [r["e2e"] for r in results]
    itl = [gap for r in results for gap in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "seconds": seconds, "request_throughput": len(results) / seconds,
            "output_tokens_per_s": tokens / seconds,
            **{f"{name}_p{q}": pct(values, q) for name, values in (("ttft", ttft), ("itl", itl), ("e2e", e2e))
               for q in (50, 99)}}


@contextlib.contextmanager
def llama_fast_server(gguf: str, dtype: str, max_running: int):
    """`llama-fast serve` on a free loopback port, its base URL; stopped (SIGTERM) at the end."""
    port = free_port()
    command = [sys.executable, "-m", "llama_fast", "serve", "--model", gguf, "--dtype", dtype, "--port", str(port),
               "--max-running", str(max_running)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama-fast serve exited with {process.returncode}: {process.stderr.read()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("llama-fast serve did not start within 300 s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(60)


def generate_per_token_s(gguf: str, dtype: str, tokens: int = 128) -> float:
    """The median decode step of one sequence in-process (the C++ session `llama-fast generate` runs)."""
    from llama_fast.llm import LLM
    from llama_fast.sampling import SamplingParams

    llm = LLM.from_pretrained(gguf, dtype=dtype, progress=False)
    prompt = workload(llm.tokenizer, 1, ((128,), (tokens,)))[0][0]
    stamps = [time.perf_counter() for _ in llm.generate_ids([prompt], [SamplingParams(temperature=0)], tokens,
                                                            stop_at_eos=False)]
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def run_all(url: str, model: str, requests, args) -> dict:
    asyncio.run(closed_loop(url, model, requests[:2], 1))   # warm up (first-request costs)
    runs = {}
    for concurrency in args.concurrency:
        results, seconds = asyncio.run(closed_loop(url, model, requests[:args.requests], concurrency))
        runs[f"concurrency {concurrency}"] = summary(results, seconds)
        print(f"  concurrency {concurrency}: {fmt(runs[f'concurrency {concurrency}'])}", flush=True)
    results, seconds = asyncio.run(open_loop(url, model, requests[:args.requests], args.rate))
    runs[f"rate {args.rate}/s"] = summary(results, seconds)
    print(f"  Poisson {args.rate}/s: {fmt(runs[f'rate {args.rate}/s'])}", flush=True)
    return runs


def fmt(s: dict) -> str:
    return (f"{s['request_throughput']:.2f} req/s, {s['output_tokens_per_s']:.1f} tok/s, TTFT p50/p99 "
            f"{s['ttft_p50'] * 1e3:.0f}/{s['ttft_p99'] * 1e3:.0f} ms, ITL p50/p99 {s['itl_p50'] * 1e3:.1f}/"
            f"{s['itl_p99'] * 1e3:.1f} ms, e2e p50/p99 {s['e2e_p50']:.2f}/{s['e2e_p99']:.2f} s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter lengths, concurrency 1 4 8, 16 requests a run")
    ap.add_argument("--dtype", default="float32", choices=list(GGUF_TYPE))
    ap.add_argument("--threads", type=int, default=2, help="llama-server's threads (llama_fast picks by measuring)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 1 4 8 16 (quick: 1 4 8)")
    ap.add_argument("--rate", type=float, default=None, help="Poisson requests per second (default 2, quick 1)")
    ap.add_argument("--requests", type=int, default=None, help="requests per run (default 48, quick 16)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="run llama_fast only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args(argv)
    args.concurrency = args.concurrency or ([1, 4, 8] if args.quick else [1, 4, 8, 16])
    args.rate = args.rate or (1.0 if args.quick else 2.0)
    args.requests = args.requests or (16 if args.quick else 48)
    mix = MIX["quick" if args.quick else "full"]
    gguf = gguf_copy(GGUF_TYPE[args.dtype])
    requests = workload(Tokenizer.from_pretrained(gguf), args.requests, mix)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor(),
              "load_average": os.getloadavg(), "dtype": args.dtype, "threads": args.threads, "mix": mix,
              "requests_per_run": args.requests, "rate": args.rate, "servers": {}}
    report["generate_per_token_s"] = generate_per_token_s(gguf, args.dtype)
    print(f"llama-fast generate, one sequence: {report['generate_per_token_s'] * 1e3:.1f} ms/token", flush=True)
    print("llama_fast (llama-fast serve):", flush=True)
    with llama_fast_server(gguf, args.dtype, max(args.concurrency)) as url:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        report["servers"]["llama_fast"] = run_all(url, model, requests, args)
    if not args.no_llama_cpp:
        longest = max(mix[0]) + max(mix[1]) + 16
        print("llama.cpp (llama-server):", flush=True)
        with llama_cpp_bin.LlamaServer(gguf, parallel=max(args.concurrency), ctx_per_slot=longest,
                                       threads=args.threads) as server:
            report["servers"]["llama.cpp"] = run_all(server.url, "smollm2", requests, args)
    print_table(report)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_serving.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    plot(report, os.path.join(args.out, "bench_serving.png"))


def print_table(report: dict) -> None:
    print(f"\n{report['date']}, {report['dtype']}, load average {report['load_average'][0]:.2f}; "
          f"llama-fast generate {report['generate_per_token_s'] * 1e3:.1f} ms/token\n")
    print("| server | run | req/s | output tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | e2e p50 / p99 (s) |")
    print("|---|---|--:|--:|--:|--:|--:|")
    for server, runs in report["servers"].items():
        for run, s in runs.items():
            print(f"| {server} | {run} | {s['request_throughput']:.2f} | {s['output_tokens_per_s']:.1f} | "
                  f"{s['ttft_p50'] * 1e3:.0f} / {s['ttft_p99'] * 1e3:.0f} | {s['itl_p50'] * 1e3:.1f} / "
                  f"{s['itl_p99'] * 1e3:.1f} | {s['e2e_p50']:.2f} / {s['e2e_p99']:.2f} |")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for server, runs in report["servers"].items():
        closed = {int(run.split()[1]): s for run, s in runs.items() if run.startswith("concurrency")}
        levels = sorted(closed)
        for ax, key, scale in ((axes[0], "output_tokens_per_s", 1), (axes[1], "ttft_p99", 1e3), (axes[2], "itl_p50", 1e3)):
            ax.plot(levels, [closed[c][key] * scale for c in levels], "-o", label=server)
    for ax, title in zip(axes, ("output tokens/s", "TTFT p99 (ms)", "ITL p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Serving SmolLM2-135M ({report['dtype']}), {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
