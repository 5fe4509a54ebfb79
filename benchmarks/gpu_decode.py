#!/usr/bin/env python3
"""Decode on the GPU (needs CUDA): one-token steps replayed from CUDA graphs (llama_fast.cuda_graphs)
against the same steps run eagerly through the model's forward, greedy, on the same static cache layout.

The embedded SmolLM2-135M when its package is installed, else random weights of its shapes (GPU machines
here are offline; the comparison and the timings only need the shapes). Checks the two give the same
tokens (same kernels in the same order: they must match exactly) and reports decode steps/s at batch 1
and 8 in fp16, bf16 and bf16 with int8 / int4 weight-only matrices, and how many graphs were captured (one
per batch size and length bucket).
Exits 1 when the tokens differ. Run: python benchmarks/gpu_decode.py [--new-tokens 256]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from llama_fast.cache import StaticKVCache
from llama_fast.config import ModelConfig
from llama_fast.cuda_graphs import CudaGraphDecodePath
from llama_fast.loaders import DEFAULT_MODEL, CheckpointError, load_checkpoint
from llama_fast.model import Transformer, build_model, pack_weights

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


def greedy(model, prompt: torch.Tensor, new_tokens: int, graphs: CudaGraphDecodePath | None):
    """prompt (B, T) -> (generated (B, new_tokens) token ids, decode steps per second)."""
    B, T = prompt.shape
    c = model.config
    if graphs is not None:
        cache = graphs.new_cache(B, T + new_tokens)
    else:
        cache = StaticKVCache(c.n_layers, B, T + new_tokens, c.n_kv_heads, c.head_dim,
                              dtype=model.dtype, device="cuda")
    logits = model(prompt, cache)[:, -1]
    out = [logits.argmax(-1)]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = graphs.step(out[-1], cache) if graphs is not None else model(out[-1][:, None], cache)[:, -1]
        out.append(logits.argmax(-1))
    torch.cuda.synchronize()
    return torch.stack(out, 1), (new_tokens - 1) / (time.perf_counter() - start)


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
        graphs = CudaGraphDecodePath(model)
        for batch in (1, 8):
            prompt = torch.randint(0, model.config.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(batch))
            prompt = prompt.cuda()
            greedy(model, prompt, 8, None), greedy(model, prompt, 8, graphs)  # warm-up: compiles, the capture
            eager_tokens, eager_rate = greedy(model, prompt, args.new_tokens, None)
            graph_tokens, graph_rate = greedy(model, prompt, args.new_tokens, graphs)
            same = torch.equal(eager_tokens, graph_tokens)
            ok &= same
            row = {"model": source, "dtype": str(dtype).split(".")[-1] + (f" {packed}" if packed else ""), "batch": batch,
                   "same_tokens": same,
                   "eager_steps_per_s": eager_rate, "graph_steps_per_s": graph_rate, "speedup": graph_rate / eager_rate,
                   "graphs_captured": graphs.captures}
            report.append(row)
            print(f"{row['dtype']:>13} batch {batch}: eager {eager_rate:.1f} steps/s, CUDA graphs {graph_rate:.1f} steps/s "
                  f"({row['speedup']:.2f}x, {batch * graph_rate:.0f} tokens/s), same tokens: {same}, "
                  f"graphs captured: {graphs.captures} ({source})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_decode.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": report}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
