"""Quantized weights against llama.cpp on the same files: the perplexity of the first --tokens tokens of the
Shakespeare text (every token scored in one pass, llama.cpp's logits from llama-cpp-python with logits_all)
per block format, and greedy text at Q8_0 on the golden prompts against fp32 and llama.cpp's Q8_0.

    .venv/bin/python benchmarks/bench_quant.py [--types q8_0 q4_0 q4_1 q4_k q6_k] [--tokens 4096]

The files are the embedded model as shipped (Q4_1, a Q8_0 embedding) and `llama-fast quantize`'s copies of
it in the other formats (llama_fast.bench.gguf_copy); "fp32" is the shipped file dequantized (its original
float weights are not shipped). Writes benchmarks/out/bench_quant.json; paste the table into RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from llama_fast import LLM
from llama_fast.bench import BLOCK_TYPES, gguf_copy
from llama_fast.paths import SAMPLE_TEXT
from llama_fast.sampling import row_params

GOLDEN = ["I love", "The capital of France is", "def fibonacci(n):"]


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    """exp(mean NLL) of ids[1:] under logits (T, vocab) of ids (each row predicts the next token)."""
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return float(torch.exp(-logp.gather(1, torch.tensor(ids[1:])[:, None]).mean()))


def greedy_ids(llm: LLM, prompt_ids: list[int], n: int = 64) -> list[int]:
    return [t for (t,) in llm.generate_ids([prompt_ids], row_params(1, 0, temperature=0.0), n, stop_at_eos=False)]


def ours(path: str, dtype: str, ids: list[int], golden: dict[str, list[int]]) -> tuple[float, dict[str, list[int]]]:
    llm = LLM.from_pretrained(path, dtype=dtype, progress=False)
    return perplexity(llm.logits(torch.tensor([ids]))[0], ids), {p: greedy_ids(llm, g) for p, g in golden.items()}


def llama_cpp(path: str, ids: list[int], golden: dict[str, list[int]], threads: int) -> tuple[float, dict[str, list[int]]]:
    from llama_cpp import Llama

    llm = Llama(path, n_ctx=len(ids) + 64, n_batch=512, logits_all=True, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    llm.eval(ids)
    ppl = perplexity(torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32)), ids)
    greedy = {}
    for prompt, prompt_ids in golden.items():  # (our tokenization: both engines get the same ids)
        llm.reset()
        tokens = llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
        greedy[prompt] = [next(tokens) for _ in range(64)]
    return ppl, greedy


def matching(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy runs share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=list(BLOCK_TYPES), choices=list(BLOCK_TYPES))
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    fp32 = LLM.from_pretrained("smollm2-135m-instruct", dtype="float32", progress=False)
    with open(SAMPLE_TEXT, encoding="utf-8") as f:
        ids = fp32.tokenizer.encode(f.read())[:args.tokens]
    if len(ids) < args.tokens:
        sys.exit(f"the sample text has only {len(ids)} tokens")
    golden = {p: fp32.tokenizer.encode(p) for p in GOLDEN}
    ppl_fp32 = perplexity(fp32.logits(torch.tensor([ids]))[0], ids)
    greedy_fp32 = {p: greedy_ids(fp32, g) for p, g in golden.items()}
    del fp32
    rows = []
    for kind in args.types:
        path = gguf_copy(kind.upper())
        start = time.perf_counter()
        ppl, greedy = ours(path, "native", ids, golden)
        seconds = time.perf_counter() - start
        peer_ppl, peer_greedy = llama_cpp(path, ids, golden, args.threads)
        rows.append({"type": kind, "path": path, "ppl": ppl, "llama_cpp_ppl": peer_ppl, "fp32_ppl": ppl_fp32,
                     "vs_llama_cpp": ppl / peer_ppl - 1, "vs_fp32": ppl / ppl_fp32 - 1, "seconds": seconds,
                     "greedy_match_fp32": {p: matching(greedy[p], greedy_fp32[p]) for p in GOLDEN},
                     "greedy_match_llama_cpp": {p: matching(greedy[p], peer_greedy[p]) for p in GOLDEN}})
        print(f"{kind}: {rows[-1]}", file=sys.stderr, flush=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tokens": len(ids),
              "threads": args.threads, "fp32_ppl": ppl_fp32, "results": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_quant.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{report['date']}: perplexity of the first {len(ids)} tokens of the Shakespeare text (one pass); "
          f"fp32 (the shipped file dequantized) {ppl_fp32:.3f}\n")
    print("| type | llama_fast | llama.cpp | llama_fast / llama.cpp | / fp32 | greedy tokens = fp32 (of 64 x 3) "
          "| = llama.cpp |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['ppl']:.3f} | {r['llama_cpp_ppl']:.3f} | {100 * r['vs_llama_cpp']:+.2f}% | "
              f"{100 * r['vs_fp32']:+.2f}% | {' / '.join(str(v) for v in r['greedy_match_fp32'].values())} | "
              f"{' / '.join(str(v) for v in r['greedy_match_llama_cpp'].values())} |")


if __name__ == "__main__":
    main()
