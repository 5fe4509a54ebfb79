"""Streaming past the context with attention sinks, on the embedded model (issue: StreamingLLM reproduced).

1. Perplexity over the first 4,096 tokens of Shakespeare with a 256-token window: dense attention, window
   + 4 sinks, window alone.
2. A 20,000-token generation with window 512 + 4 sinks (sampled, never stopping at EOS): KV blocks
   held over time (constant once the window fills), tokens/s, and the distinct-token fraction of the
   last 1,000 tokens (a collapse into one repeated token would show as ~0).
3. A batch of two such streams at once: blocks in use over time.

    .venv/bin/python benchmarks/bench_streaming.py [--parts ppl stream batch] [--tokens 20000]
        [--batch-tokens 2000] [--out benchmarks/out]

Each part's results replace that part's in benchmarks/out/bench_streaming.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from llama_fast import LLM, SpanBias
from llama_fast.sampling import row_params
from llama_fast.paths import SAMPLE_TEXT

HERE = os.path.dirname(os.path.abspath(__file__))


PROMPTS = ["Once upon a time, in a land far away,", "The recipe for a good loaf of bread is simple:"]


def sampling(llm, rows: int):
    # A mild repetition penalty over the last 64 tokens only (llama.cpp's repeat_last_n): without one the
    # stream settles into repeating a sentence; over the whole history it pushes the model off every
    # common token (seen at 20,000 tokens with 1.1: a loop of one Hebrew token).
    return row_params(rows, 7, temperature=0.8, top_p=0.95, repetition_penalty=1.1, penalty_last_n=64)


def perplexities(llm, text: str, max_tokens: int) -> dict:
    out = {}
    for name, span in [("dense", SpanBias()), ("window 256 + 4 sinks", SpanBias(window=256, sink_tokens=4)),
                       ("window 256, no sinks", SpanBias(window=256))]:
        r = llm.perplexity(text, span=span, max_tokens=max_tokens)
        out[name] = {"perplexity": r.perplexity, "tokens_per_s": r.tokens_per_s, "kv_mib": r.kv_bytes / 2**20}
        print(f"perplexity, {name}: {r.perplexity:.3f} ({r.tokens_per_s:.1f} tokens/s, KV {r.kv_bytes / 2**20:.1f} MiB)",
              flush=True)
    return out


def long_stream(streaming, n_tokens: int) -> dict:
    """One row, n_tokens sampled tokens: KV blocks held every 1,000 tokens, and how the text ends."""
    prompt = [streaming.tokenizer.encode(PROMPTS[0])]
    runners, held, tokens = [], {}, []
    start = time.perf_counter()
    for step, (token,) in enumerate(streaming.generate_ids(prompt, sampling(streaming, 1), n_tokens,
                                                           on_cache=runners.append, stop_at_eos=False)):
        tokens.append(token)
        if (step + 1) % 1000 == 0 and step + 1 < n_tokens:  # (after the last token the blocks are freed)
            held[step + 1] = runners[0].num_blocks - runners[0].num_free_blocks
            print(f"{step + 1} tokens: KV blocks held {held[step + 1]}, "
                  f"{(step + 1) / (time.perf_counter() - start):.1f} tokens/s", flush=True)
    seconds = time.perf_counter() - start
    last = tokens[-1000:]
    g = {"tokens": len(tokens), "seconds": seconds, "tokens_per_s": len(tokens) / seconds, "kv_blocks_held": held,
         "pool_blocks": runners[0].num_blocks, "distinct_fraction_last_1000": len(set(last)) / len(last),
         "tail_text": streaming.tokenizer.decode(tokens[-200:])}
    print(f"generated {g['tokens']} tokens in {seconds:.0f} s ({g['tokens_per_s']:.1f} tokens/s); "
          f"distinct-token fraction of the last 1000: {g['distinct_fraction_last_1000']:.2f}")
    print("tail:", repr(g["tail_text"][-300:]))
    return g


def batch_streams(streaming, n_tokens: int) -> dict:
    """Two rows at once: blocks in use every 100 tokens."""
    prompts = [streaming.tokenizer.encode(p) for p in PROMPTS]
    runners, blocks, rows = [], {}, [[], []]
    start = time.perf_counter()
    for step, new in enumerate(streaming.generate_ids(prompts, sampling(streaming, 2), n_tokens,
                                                      on_cache=runners.append, stop_at_eos=False)):
        for row, token in zip(rows, new):
            row.append(token)
        if (step + 1) % 100 == 0 and step + 1 < n_tokens:
            blocks[step + 1] = runners[0].num_blocks - runners[0].num_free_blocks
    seconds = time.perf_counter() - start
    runner = runners[0]
    b = {"rows": 2, "tokens_per_row": n_tokens, "seconds": seconds, "tokens_per_s": 2 * n_tokens / seconds,
         "runner": type(runner).__name__, "pool_blocks": runner.num_blocks, "blocks_in_use": blocks,
         "distinct_fraction_last_500": [len(set(r[-500:])) / 500 for r in rows]}
    print(f"batch of 2 streams on the {b['runner']}: {n_tokens} tokens per row in {seconds:.0f} s "
          f"({b['tokens_per_s']:.1f} tokens/s in all); blocks in use every 100 tokens: {list(blocks.values())}; "
          f"distinct fraction of the last 500 {b['distinct_fraction_last_500']}")
    return b


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=["ppl", "stream", "batch"], default=["ppl", "stream", "batch"])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--batch-tokens", type=int, default=2000)
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    llm = LLM.from_pretrained("smollm2-135m-instruct", progress=False)
    streaming = llm.with_span(SpanBias(window=512, sink_tokens=4))
    path = os.path.join(args.out, "bench_streaming.json")
    report = {}
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
    if "ppl" in args.parts:
        with open(SAMPLE_TEXT, encoding="utf-8") as f:
            report["perplexity"] = perplexities(llm, f.read(), args.ppl_tokens)
    if "stream" in args.parts:
        report["generation"] = long_stream(streaming, args.tokens)
    if "batch" in args.parts:
        report["batch"] = batch_streams(streaming, args.batch_tokens)
    report["date"] = time.strftime("%Y-%m-%d %H:%M")
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
