"""transformers code made fast with one line: the embedded model loaded by transformers (its GGUF loader,
fp32, dense weights), decoded by its own `generate` (eager PyTorch, "sdpa" attention) and by llama_fast on
the same weight tensors (`LLM.from_transformers`, the C++ decode step; and `integrations.transformers.generate`,
which is what an `accelerate`d `model.generate` runs). One process, the engines taking turns round after
round (bench.interleaved_times), so the report is in ratios; also the RSS that wrapping the model adds
(no weight copy) and whether the greedy tokens are identical.

    .venv/bin/python benchmarks/bench_transformers.py [--rounds 3] [--new-tokens 128] [--threads N] [--out benchmarks/out]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from llama_fast.bench import PROMPT_FILE, TransformersEngine, clocked, interleaved_times, rss_bytes


def decode_rate(stamps: list[float]) -> float:
    """Tokens per second after the first token (the prompt's cost excluded)."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both (0: torch's default)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    from llama_fast import LLM, SamplingParams
    from llama_fast.integrations import transformers as lf_hf
    from llama_fast.tokenizer import Tokenizer

    hf = TransformersEngine("float32")
    model = hf.model
    with open(PROMPT_FILE, encoding="utf-8") as f:
        text = f.read()
    LLM.from_transformers(model)  # first use: imports and set-up, outside the RSS measurement
    before = rss_bytes()
    llm = LLM.from_transformers(model)
    wrap_mib = (rss_bytes() - before) / 2**20
    shared = {p.data_ptr() for p in model.parameters()} >= {p.data_ptr() for p in llm.model.parameters()}
    from llama_fast.loaders import load_checkpoint

    tokenizer: Tokenizer = load_checkpoint("smollm2-135m-instruct", progress=False, dtype=torch.float32).tokenizer
    prompt_ids = tokenizer.encode(text)[:args.prompt_tokens]
    n = args.new_tokens
    greedy = [SamplingParams(temperature=0.0)]
    results: dict[str, list] = {"transformers": [], "llama_fast": [], "generate": []}

    def run_hf(_):
        results["transformers"].append(hf.run(prompt_ids, n))

    runners = []

    def run_llm(_):
        steps = llm.generate_ids([prompt_ids], greedy, n, on_cache=runners.append, stop_at_eos=False)
        results["llama_fast"].append(clocked(steps))

    def run_generate(_):  # the drop-in call, end to end (no per-token clock: the tensor comes back at the end)
        out = lf_hf.generate(model, torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n, eos_token_id=None)
        results["generate"].append(out[0, len(prompt_ids):].tolist())

    run_llm(0), run_generate(0)  # warm-up (first-use set-up)
    for r in results.values():
        r.clear()
    times = interleaved_times({"transformers": run_hf, "llama_fast": run_llm, "generate": run_generate}, args.rounds)

    hf_rate = statistics.median(decode_rate(s) for _, s in results["transformers"])
    lf_rate = statistics.median(decode_rate(s) for _, s in results["llama_fast"])
    hf_tokens = results["transformers"][0][0]
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "prompt_tokens": len(prompt_ids), "new_tokens": n, "rounds": args.rounds,
        "transformers_decode_tokens_per_s": hf_rate,
        "llama_fast_decode_tokens_per_s": lf_rate,
        "decode_speedup": lf_rate / hf_rate,
        "end_to_end_s": {name: statistics.median(t) for name, t in times.items()},
        "generate_speedup_end_to_end": statistics.median(times["transformers"]) / statistics.median(times["generate"]),
        "wrap_rss_growth_mib": wrap_mib,
        "weights_shared": shared,
        "greedy_identical": all(ids == hf_tokens for ids, _ in results["llama_fast"])
        and all(ids == hf_tokens for ids in results["generate"]),
        "isa": runners[-1].isa if runners and hasattr(runners[-1], "isa") else None,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_transformers_{time.strftime('%Y%m%d_%H%M%S')}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"prompt {len(prompt_ids)} tokens, {n} new, {args.rounds} rounds, {report['machine']['threads']} threads")
    print(f"decode tokens/s: transformers generate {hf_rate:.1f}, LLM.from_transformers {lf_rate:.1f} "
          f"({report['decode_speedup']:.2f}x)")
    print("end to end s (median): " + ", ".join(f"{k} {v:.2f}" for k, v in report["end_to_end_s"].items())
          + f"; generate() {report['generate_speedup_end_to_end']:.2f}x model.generate")
    print(f"wrapping: RSS +{wrap_mib:.1f} MiB, weights shared: {shared}; greedy identical: {report['greedy_identical']}")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
