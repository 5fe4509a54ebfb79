#!/usr/bin/env python3
"""Decode on the GPU (needs CUDA): the model's runner (llama_fast.model_runner, what LLM and the Engine step
on CUDA) with its one-token steps replayed from CUDA graphs (llama_fast.cuda_graphs) against the same runner
running them eagerly through the model's forward, greedy, over the same paged cache.

The embedded SmolLM2-135M when its package is installed, else random weights of its shapes (GPU machines
here are offline; the comparison and the timings only need the shapes). Checks the two give the same
tokens (same kernels in the same order: they must match exactly) and reports decode steps/s at batch 1
and 8 in fp16, bf16 and bf16 with int8 / int4 weight-only matrices (each step includes the runner's host
bookkeeping and the logits' copy to the host, as in generation), and how many graphs were captured (one per
batch bucket and block-table width bucket).
Exits 1 when the tokens differ. Run: python benchmarks/gpu_decode.py [--new-tokens 256]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from llama_fast.config import ModelConfig
from llama_fast.loaders import DEFAULT_MODEL, CheckpointError, load_checkpoint
from llama_fast.model import Transformer, build_model, pack_weights
from llama_fast.model_runner import ModelRunner
from llama_fast.session import blocks_for_sequence

SMOLLM2_135M = ModelConfig(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_dim=1536,
                           rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True)


def load_model(dtype: torch.dtype):
    try:
        ckpt = load_checkpoint(DEFAULT_MODEL, progress=False, dtype=dtype)
        return build_model(ckpt.config, ckpt.weights, dtype=dtype, device="cuda"), "SmolLM2-135M"
    except CheckpointError:
        gen = torch.Generator().manual_seed(0)
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in Transformer(SMOLLM2_135M).state_dict().items()}
        weights = {k: 1 + 0.1 * torch.randn(s, generator=gen) if len(s) == 1 else torch.randn(s, generator=gen) / s[1] ** 0.5
                   for k, s in shapes.items()}
        return build_model(SMOLLM2_135M, weights, dtype=dtype, device="cuda"), "random weights, SmolLM2-135M shapes"


def greedy(runner: ModelRunner, prompt: torch.Tensor, new_tokens: int):
    """prompt (B, T) -> (generated (B, new_tokens) token ids, decode steps per second)."""
    seqs = [runner.add_sequence() for _ in range(prompt.shape[0])]
    logits = runner.step([(s, row.tolist()) for s, row in zip(seqs, prompt)])  # (B, vocab) on the host
    out = [logits.argmax(-1)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = runner.step([(s, [int(t)]) for s, t in zip(seqs, out[-1])])
        out.append(logits.argmax(-1))
    torch.cuda.synchronize()
    rate = (new_tokens - 1) / (time.perf_counter() - start)
    for s in seqs:
        runner.free(s)
    return torch.stack(out, 1), rate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = parser.parse_args(argv)
    report, ok = [], True
    # fp16, bf16, and bf16 with the matrices packed as CUDA's weight-only int8 / int4 (what dtype="int8" loads)
    for dtype, packed in ((torch.float16, None), (torch.bfloat16, None), (torch.bfloat16, "int8"),
                          (torch.bfloat16, "int4")):
        model, source = load_model(dtype)
        if packed is not None:
            pack_weights(model, packed)
        for batch in (1, 8):
            blocks = batch * blocks_for_sequence(32 + args.new_tokens, 32, 0, 0)
            eager, graphs = (ModelRunner(model, num_blocks=blocks, graphs=g) for g in (False, True))
            prompt = torch.randint(0, model.config.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(batch))
            greedy(eager, prompt, 8), greedy(graphs, prompt, 8)  # warm-up: compiles, the captures
            eager_tokens, eager_rate = greedy(eager, prompt, args.new_tokens)
            graph_tokens, graph_rate = greedy(graphs, prompt, args.new_tokens)
            same = torch.equal(eager_tokens, graph_tokens)
            ok &= same
            row = {"model": source, "dtype": str(dtype).split(".")[-1] + (f" {packed}" if packed else ""), "batch": batch,
                   "same_tokens": same,
                   "eager_steps_per_s": eager_rate, "graph_steps_per_s": graph_rate, "speedup": graph_rate / eager_rate,
                   "graphs_captured": graphs.graphs.captures}
            report.append(row)
            print(f"{row['dtype']:>13} batch {batch}: eager {eager_rate:.1f} steps/s, CUDA graphs {graph_rate:.1f} steps/s "
                  f"({row['speedup']:.2f}x, {batch * graph_rate:.0f} tokens/s), same tokens: {same}, "
                  f"graphs captured: {graphs.graphs.captures} ({source})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_decode.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": report}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
