"""Tensor-parallel decode: the all-reduces of a decode step and their share of its time, at tp=N on this
machine (gloo, one process per rank, each running the C++ session on its shard), beside one process running
the whole model; then the speed-up N GPUs would give, projected from the bytes each step moves.

A random-weight model of the given shape (default: 16 layers, dim 1024, 16/4 heads, FFN 4096, bf16) decodes
--steps tokens at batch 1 after a 128-token prompt. Reported: ms per decode step alone and at tp=N,
all-reduces per step (2 per layer; the logits' gather apart), the time inside them, a bare all-reduce of one
step's activations between the ranks (gloo's own latency here), and the projection:
a decode step on one GPU reads every weight once (bytes / HBM bandwidth); at tp=N each GPU reads 1/N of the
sharded weights and the step adds 2 x layers all-reduces of batch x dim activations, each costing a
latency plus 2 (N - 1) / N of its bytes over the link (a ring). The GPU figures are options, not measured.

    .venv/bin/python benchmarks/bench_tp.py [--tp 2] [--threads 1] [--steps 64] [--dtype bfloat16]
        [--layers 16 --dim 1024 --heads 16 --kv-heads 4 --ffn 4096]
        [--gpu-hbm-gbs 4800 --gpu-link-gbs 450 --allreduce-latency-us 8] [--project-shape 8b]

With --gguf FILE [--gguf-dtype D] it measures loading instead: tp ranks load the file with LLM.from_pretrained(tensor_parallel=N)
and generate 8 greedy tokens, twice (the second load maps the shard cache where the first wrote one: a fresh
LLAMA_FAST_CACHE_DIR shows a first load), then one process does the same; reported: each one's peak RSS after
loading and after generating, against the file's size, the seconds loading took, and whether the tokens are
the same.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from llama_fast.bench import free_port
from llama_fast.config import ModelConfig
from llama_fast.session import SessionRunner

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import models  # noqa: E402  (the tests' random-weight models)

PROMPT_TOKENS = 128
BARE_ALLREDUCES = 200
LLAMA_8B = dict(layers=32, dim=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256)


def random_model(args):
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                      vocab_size=args.vocab, ffn_dim=args.ffn, max_seq_len=4096)
    return models.random_model(cfg, dtype=getattr(torch, args.dtype))


def prefilled(runner: SessionRunner) -> int:
    """A new sequence of `runner` with the prompt in its cache."""
    seq = runner.add_sequence()
    runner.step([(seq, list(range(1, PROMPT_TOKENS + 1)))])
    return seq


def decode_steps(runner: SessionRunner, seq: int, steps: int) -> list[float]:
    """The seconds of each of `steps` one-token steps of `seq`."""
    times = []
    for i in range(steps):
        start = time.perf_counter()
        runner.step([(seq, [7 + i % 100])])
        times.append(time.perf_counter() - start)
    return times


def rank_main(args) -> None:
    """One rank: its shard, the session, the all-reduce timed."""
    from llama_fast.tensor_parallel import shard_bytes, shard_model

    model = random_model(args)
    shard_model(model, args.tp, timeout_s=120)
    tp = model.tp
    spent, calls = [0.0], [0]
    reduce = tp.all_reduce

    def timed(partial):
        start = time.perf_counter()
        reduce(partial)
        spent[0] += time.perf_counter() - start
        calls[0] += 1

    tp.all_reduce = timed
    bare = torch.zeros(args.dim)  # one decode step's activations, all-reduced with nothing else running
    for _ in range(20):
        reduce(bare)
    start = time.perf_counter()
    for _ in range(BARE_ALLREDUCES):
        reduce(bare)
    bare_us = 1e6 * (time.perf_counter() - start) / BARE_ALLREDUCES
    runner = SessionRunner(model, num_blocks=64, num_threads=args.threads)
    seq = prefilled(runner)
    decode_steps(runner, seq, 4)  # warm-up
    spent[0], calls[0] = 0.0, 0
    times = decode_steps(runner, seq, args.steps)  # (the prompt's all-reduces not counted)
    if tp.plan.rank == 0:
        with open(args.result, "w") as f:
            json.dump({"step_ms": 1000 * sorted(times)[len(times) // 2], "allreduce_ms_per_step": 1000 * spent[0] / args.steps,
                       "allreduces_per_step": calls[0] / args.steps, "shard_bytes": shard_bytes(model),
                       "bare_allreduce_us": bare_us}, f)


def load_main(args) -> None:
    """One process (or rank, with --tp > 1 and RANK set) loading args.gguf: peak RSS after loading and after
    generating, and the tokens."""
    from llama_fast import LLM
    from llama_fast.bench import peak_rss_bytes

    world = args.tp if "RANK" in os.environ else 1
    start = time.perf_counter()
    llm = LLM.from_pretrained(args.gguf, dtype=args.gguf_dtype, tensor_parallel=world, progress=False)
    load_s = time.perf_counter() - start
    loaded = peak_rss_bytes()
    tokens = llm.generate(list(range(1, 17)), max_new_tokens=8).token_ids
    with open(args.result.replace("RANK", os.environ.get("RANK", "alone")), "w") as f:
        json.dump({"load_peak_mib": loaded / 2**20, "peak_mib": peak_rss_bytes() / 2**20, "tokens": tokens,
                   "load_s": load_s}, f)


def launch_ranks(args, argv, result_path: str) -> None:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", "--result", result_path, *(argv or sys.argv[1:])],
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(args.tp), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), OMP_NUM_THREADS=str(args.threads)))
             for r in range(args.tp)]
    if any(p.wait() for p in procs):
        raise SystemExit("a rank failed")


def compare_loads(args, argv) -> None:
    """The ranks load twice (the second load maps the shard cache where the first wrote one), then one process."""
    loads = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in ("first", "again"):
            pattern = os.path.join(tmp, f"{run}-RANK.json")
            launch_ranks(args, argv, pattern)
            loads[run] = [json.load(open(pattern.replace("RANK", str(r)))) for r in range(args.tp)]
        pattern = os.path.join(tmp, "RANK.json")
        subprocess.run([sys.executable, __file__, "--rank", "--result", pattern, *(argv or sys.argv[1:])], check=True,
                       env={k: v for k, v in os.environ.items() if k != "RANK"})
        alone = json.load(open(pattern.replace("RANK", "alone")))
    size = os.path.getsize(args.gguf) / 2**20
    print(f"{os.path.basename(args.gguf)} ({size:.0f} MiB): one process peak RSS {alone['load_peak_mib']:.0f} MiB after "
          f"loading, {alone['peak_mib']:.0f} after 8 tokens")
    for run, ranks in loads.items():
        for r, res in enumerate(ranks):
            print(f"tp={args.tp} rank {r}, {run} load: peak RSS {res['load_peak_mib']:.0f} MiB after loading, "
                  f"{res['peak_mib']:.0f} after 8 tokens, {res['load_s']:.1f} s to load")
    print(f"same tokens: {all(res['tokens'] == alone['tokens'] for ranks in loads.values() for res in ranks)}")


def projection(shape: dict, tp: int, args, bytes_per_weight: int = 2) -> dict:
    """Decode step time at batch 1 on one GPU and on tp GPUs, from bytes moved (not measured)."""
    d, f, L, V = shape["dim"], shape["ffn"], shape["layers"], shape["vocab"]
    head_dim = d // shape["heads"]
    per_layer = d * head_dim * (2 * shape["heads"] + 2 * shape["kv_heads"]) + 3 * d * f
    weights = (L * per_layer + 2 * V * d) * bytes_per_weight
    one = weights / (args.gpu_hbm_gbs * 1e9)
    sharded = (L * per_layer + V * d) * bytes_per_weight / tp + V * d * bytes_per_weight  # embedding replicated
    activations = d * bytes_per_weight
    allreduce = 2 * L * (args.allreduce_latency_us * 1e-6 + 2 * (tp - 1) / tp * activations / (args.gpu_link_gbs * 1e9))
    many = sharded / (args.gpu_hbm_gbs * 1e9) + allreduce
    return {"weight_gb": weights / 1e9, "one_gpu_ms": 1000 * one, "tp_ms": 1000 * many,
            "allreduce_ms": 1000 * allreduce, "speedup": one / many}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per rank (one process gets tp x this)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--gpu-hbm-gbs", type=float, default=4800.0, help="GPU memory bandwidth, GB/s (H200: 4800)")
    ap.add_argument("--gpu-link-gbs", type=float, default=450.0, help="GPU-GPU bandwidth per direction, GB/s (NVLink 4)")
    ap.add_argument("--allreduce-latency-us", type=float, default=8.0, help="one small all-reduce inside a CUDA graph")
    ap.add_argument("--gguf", help="measure loading this file instead (peak RSS per rank; see above)")
    ap.add_argument("--gguf-dtype", help="the dtype --gguf loads in (default: the file's; e.g. native, q8_0)")
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank:
        return load_main(args) if args.gguf else rank_main(args)
    if args.gguf:
        return compare_loads(args, argv)

    torch.set_num_threads(args.tp * args.threads)
    runner = SessionRunner(random_model(args), num_blocks=64)
    alone = decode_steps(runner, prefilled(runner), args.steps + 4)[4:]
    alone_ms = 1000 * sorted(alone)[len(alone) // 2]
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "rank0.json")
        launch_ranks(args, argv, result_path)
        ranks = json.load(open(result_path))
    share = ranks["allreduce_ms_per_step"] / ranks["step_ms"]
    shape = dict(layers=args.layers, dim=args.dim, heads=args.heads, kv_heads=args.kv_heads, ffn=args.ffn, vocab=args.vocab)
    print(f"model {shape} {args.dtype}; one process x {args.tp * args.threads} threads vs {args.tp} ranks x "
          f"{args.threads} threads (gloo)")
    print(f"decode step, batch 1: alone {alone_ms:.2f} ms, tp={args.tp} {ranks['step_ms']:.2f} ms "
          f"({alone_ms / ranks['step_ms']:.2f}x)")
    print(f"all-reduces per step: {ranks['allreduces_per_step']:.0f} (+1 gather of the logits), "
          f"{ranks['allreduce_ms_per_step']:.2f} ms inside them (waiting for the slower rank included) = {100 * share:.0f}% of the step")
    print(f"a bare all-reduce of {args.dim} floats between the ranks, nothing else running: {ranks['bare_allreduce_us']:.0f} us")
    for name, sh in (("this shape", shape), ("Llama-3.1-8B", LLAMA_8B)):
        p = projection(sh, args.tp, args)
        print(f"projected on {args.tp} GPUs ({name}, bf16, {p['weight_gb']:.1f} GB): one GPU {p['one_gpu_ms']:.3f} ms/step, "
              f"tp={args.tp} {p['tp_ms']:.3f} ms ({p['allreduce_ms']:.3f} ms all-reduce) -> {p['speedup']:.2f}x")


if __name__ == "__main__":
    main()
