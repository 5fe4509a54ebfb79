"""Sampler speed: the C++ sampler (llama_fast._C through ops.sample) against the pure-PyTorch reference
(reference.sample: per row, sort-based top-p) and a batched eager-PyTorch sampler as Hugging Face's
logits warpers do it (full sort of the batch, cumsum, torch.multinomial).

    .venv/bin/pytest benchmarks/bench_sampling.py --benchmark-enable      # pytest-benchmark's table
    .venv/bin/python benchmarks/bench_sampling.py [--json out.json]       # a markdown table of ratios

Settings: temperature 0.8, top_p 0.95 (the sort-heavy path), B in {1, 8, 64}, V in {32000, 49152, 128256}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import pytest
import torch

from llama_fast import SamplingParams, ops, reference

BATCHES = (1, 8, 64)
VOCABS = (32000, 49152, 128256)
PARAMS = SamplingParams(temperature=0.8, top_p=0.95, seed=0)


def make_logits(B: int, V: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(B * V)
    return torch.randn(B, V, generator=g) * 3


def torch_batched(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """Eager PyTorch as HF generate does it: temperature, sorted top-p over the batch, multinomial."""
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before >= p.top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice)[:, 0]


def runner(impl: str, B: int, V: int):
    logits = make_logits(B, V)
    params = [PARAMS] * B
    if impl == "cpp":
        return lambda: ops.sample(logits, params, step=1, backend="cpu")
    if impl == "reference":
        return lambda: reference.sample(logits, params, step=1)
    g = torch.Generator().manual_seed(0)
    return lambda: torch_batched(logits, PARAMS, g)


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("impl", ["cpp", "torch_batched", "reference"])
def test_sample(benchmark, impl, B, V):
    fn = runner(impl, B, V)
    benchmark.group = f"sample B={B} V={V}"
    rounds = 3 if impl == "reference" and B == 64 else 10
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


def median_ms(fn, min_time=0.3, max_rounds=50) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    rows = []
    print(f"torch threads: {torch.get_num_threads()}")
    print("| B | V | C++ ms | eager batched ms | reference ms | vs batched | vs reference |")
    print("|---|---|---|---|---|---|---|")
    for B in BATCHES:
        for V in VOCABS:
            t = {impl: median_ms(runner(impl, B, V)) for impl in ("cpp", "torch_batched", "reference")}
            rows.append({"B": B, "V": V, **t})
            print(f"| {B} | {V} | {t['cpp']:.3f} | {t['torch_batched']:.2f} | {t['reference']:.2f} | "
                  f"{t['torch_batched'] / t['cpp']:.1f}x | {t['reference'] / t['cpp']:.1f}x |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
