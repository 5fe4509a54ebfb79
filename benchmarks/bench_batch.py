"""Batch benchmark: aggregate decode tokens/s of many sequences at once, llama_fast's C++ session against
llama.cpp's batched decode (llama-batched-bench) on the same weights, in one run.

For each batch size B (default 1, 2, 4, 8, 16): B distinct 128-token prompts (windows of the Shakespeare
text), 128 new tokens each, EOS ignored, greedy, the same thread count. Reported as llama-batched-bench
reports its S_TG: decode tokens (B x new tokens) over the decode time, the prompts' time apart (S_PP).
llama_fast runs through LLM's generation loop (sampling included); llama.cpp through its own bench
program (scripts/build_llama_cpp.sh builds it once; without it only llama_fast runs, and says so).

    .venv/bin/python benchmarks/bench_batch.py [--dtypes float32 bfloat16] [--batches 1 2 4 8 16]
        [--prompt-tokens 128] [--new-tokens 128] [--threads 2] [--rounds 2] [--out benchmarks/out]

Writes bench_batch.json and bench_batch.png into --out; paste the printed table into RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from llama_fast import LLM
from llama_fast.bench import gguf_copy, save_chart
from llama_fast.paths import SAMPLE_TEXT
from llama_fast.sampling import SamplingParams

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
GGUF_TYPE = {"float32": "F32", "bfloat16": "BF16"}


def prompts(llm: LLM, count: int, length: int) -> list[list[int]]:
    """`count` distinct prompts of `length` tokens: consecutive windows of the text."""
    with open(SAMPLE_TEXT, encoding="utf-8") as f:
        ids = llm.tokenizer.encode(f.read())
    if len(ids) < count * length:
        raise SystemExit(f"the prompt text has {len(ids)} tokens, fewer than {count} x {length}")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def llama_fast_run(llm: LLM, batch: list[list[int]], new_tokens: int) -> dict:
    """One batch through LLM.generate_ids (the C++ session): prompt time (to the first tokens) and decode time
    (the rest), and the ISA its kernels ran."""
    params = [SamplingParams(temperature=0.0)] * len(batch)
    runners = []
    start = time.perf_counter()
    started = set()  # rows with their first token
    first, decode_tokens = None, 0
    for step in llm.generate_ids(batch, params, new_tokens, on_cache=runners.append, stop_at_eos=False):
        if first is not None:
            decode_tokens += sum(t is not None for t in step)
        started |= {row for row, t in enumerate(step) if t is not None}
        if first is None and len(started) == len(batch):
            first = time.perf_counter()  # every prompt is in: decode from here (llama-batched-bench's S_TG)
    end = time.perf_counter()
    return {"pp_s": first - start, "tg_s": end - first, "pp_tps": len(batch) * len(batch[0]) / (first - start),
            "tg_tps": decode_tokens / (end - first), "isa": runners[0].isa}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(GGUF_TYPE))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="runs per engine and batch size (the best is kept)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="run llama_fast only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    peer = None
    if not args.no_llama_cpp:
        import llama_cpp_bin

        try:
            llama_cpp_bin.program("llama-batched-bench")
            peer = llama_cpp_bin
        except llama_cpp_bin.LlamaCppError as err:
            print(f"llama.cpp not run: {err}", file=sys.stderr)
    isa = None
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "results": {}}
    for dtype in args.dtypes:
        llm = LLM.from_pretrained("smollm2-135m-instruct", dtype=getattr(torch, dtype), progress=False)
        batch_all = prompts(llm, max(args.batches), args.prompt_tokens)
        ours = {B: [] for B in args.batches}
        theirs = {B: [] for B in args.batches}
        for _ in range(args.rounds):  # the engines take turns, round after round: the machine's drift hits both
            for B in args.batches:
                ours[B].append(llama_fast_run(llm, batch_all[:B], args.new_tokens))
            if peer is not None:
                rows = peer.batched_bench(gguf_copy(GGUF_TYPE[dtype]), args.batches, args.prompt_tokens,
                                          args.new_tokens, args.threads)
                for B in args.batches:
                    theirs[B].append(rows[B])
        rows = {}
        for B in args.batches:
            best = max(ours[B], key=lambda r: r["tg_tps"])
            row = {"llama_fast": {k: best[k] for k in ("pp_tps", "tg_tps")}}
            line = f"{dtype} B={B:2d}: llama_fast decode {row['llama_fast']['tg_tps']:7.1f} tok/s"
            if peer is not None:
                row["llama.cpp"] = max(theirs[B], key=lambda r: r["tg_tps"])
                ratio = row["llama_fast"]["tg_tps"] / row["llama.cpp"]["tg_tps"]
                line += f" | llama.cpp {row['llama.cpp']['tg_tps']:7.1f} tok/s | ratio {ratio:5.2f}x"
            print(line, flush=True)
            rows[B] = row
        isa = ours[args.batches[0]][0]["isa"]
        report["results"][dtype] = rows
        del llm
    report["isa"] = isa
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_batch.json"), "w") as f:
        json.dump(report, f, indent=1)
    print_table(report)
    plot(report, os.path.join(args.out, "bench_batch.png"))


def print_table(report: dict) -> None:
    print(f"\n{report['date']}, isa {report['isa']}, {report['threads']} threads, {report['prompt_tokens']}-token "
          f"prompts, {report['new_tokens']} new tokens; aggregate decode tokens/s (prompt tokens/s)")
    for dtype, rows in report["results"].items():
        print(f"\n| {dtype} | " + " | ".join(f"B={B}" for B in rows) + " |")
        print("|---|" + "---|" * len(rows))
        engines = ["llama_fast"] + (["llama.cpp"] if "llama.cpp" in next(iter(rows.values())) else [])
        for engine in engines:
            print(f"| {engine} | " + " | ".join(
                f"{r[engine]['tg_tps']:.1f} ({r[engine]['pp_tps']:.0f})" for r in rows.values()) + " |")
        one = next(iter(rows.values()))["llama_fast"]["tg_tps"]
        print("| llama_fast / its B=1 | " + " | ".join(f"{r['llama_fast']['tg_tps'] / one:.2f}x" for r in rows.values()) + " |")
        if len(engines) == 2:
            print("| llama_fast / llama.cpp | " + " | ".join(
                f"{r['llama_fast']['tg_tps'] / r['llama.cpp']['tg_tps']:.2f}x" for r in rows.values()) + " |")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dtype, rows in report["results"].items():
        batches = list(rows)
        for engine, style in (("llama_fast", "-o"), ("llama.cpp", "--s")):
            if engine in rows[batches[0]]:
                ax.plot(batches, [rows[B][engine]["tg_tps"] for B in batches], style, label=f"{engine} {dtype}")
    ax.set_xscale("log", base=2)
    save_chart(fig, ax, path, f"Batched decode, SmolLM2-135M, {report['threads']} threads ({report['isa']})",
               "sequences decoding at once (B)", "aggregate decode tokens/s")


if __name__ == "__main__":
    main()
