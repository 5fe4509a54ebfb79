"""Decode benchmark: llama_fast against transformers eager and llama.cpp on the same weights.

Every engine runs in its own worker process (so each has its own peak RSS) and the engines take turns,
round after round, in one run: the machine's noise hits them alike, and the report is in ratios.
Same prompt (128 tokens of Shakespeare), same number of new tokens (128), greedy, same thread count.

    llama-fast bench [--dtypes float32 bfloat16] [--rounds 3] [--out benchmarks/out]
    (or .venv/bin/python benchmarks/bench_decode.py with the same options)

llama.cpp runs when llama-cpp-python is installed (`pip install -e .[bench]`): the script writes F32,
F16 and BF16 copies of the embedded GGUF once (into ~/.cache/llama_fast/bench) and runs those plus the
original Q4_1. Reports per engine: time to first token (median over the full runs and --ttft-repeats
one-token requests per round), decode tokens/s, ms/token p50 and p99, peak RSS, and the fraction of the
memory-bandwidth floor (weight bytes / measured copy bandwidth) and of the measured read bandwidth (the
weights' bytes per second over the best rate a plain sum reads memory at); and the cold start of `llama-fast
generate` to its first printed byte (its torch-free fast start, and through the torch engine). Writes JSON
and a PNG chart; paste the printed table into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

from .sampling import row_params
from .validate import BLOCK_DTYPES

from .paths import SAMPLE_TEXT as PROMPT_FILE  # package data: found in a checkout and when installed


def rss_bytes() -> int:
    """This process's resident memory now, in bytes (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes(pid: int | str = "self") -> int:
    """A process's peak resident memory since its exec, in bytes (Linux: VmHWM). Not getrusage's ru_maxrss:
    a worker that multiprocessing or subprocess forked from a big parent and then exec'd inherits the
    parent's peak there."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def free_port() -> int:
    """A loopback port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # a checkout, or site-packages when installed
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "llama_fast", "bench")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FLOAT_GGUF_TYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
BLOCK_TYPES = tuple(BLOCK_DTYPES)  # llama_fast runs the GGUF that llama.cpp runs


# ----------------------------------------------------------------------------------------------------
# Engines: each returns (token ids, per-token timestamps relative to the start of the request).

def clocked(steps) -> tuple[list[int], list[float]]:
    """Runs a one-row decode loop ([token] per step, as generate_ids yields) -> (token ids, their timestamps)."""
    start, stamps, ids = time.perf_counter(), [], []
    for (token,) in steps:
        stamps.append(time.perf_counter() - start)
        ids.append(token)
    return ids, stamps


class LlamaFastEngine:
    """The embedded model in a float dtype, or a block format's GGUF (the file llama.cpp reads) as stored."""

    def __init__(self, dtype: str, backend: str | None):
        from llama_fast import LLM

        if backend:
            os.environ["LLAMA_FAST_BACKEND"] = backend
        if dtype in DTYPE_BYTES:
            self.llm = LLM.from_pretrained("smollm2-135m-instruct", dtype=dtype, progress=False)
        else:
            self.llm = LLM.from_pretrained(gguf_copy(dtype.upper()), dtype="native", progress=False)

    def weight_bytes(self) -> int:
        model = self.llm.model
        return (sum(p.numel() * p.element_size() for p in model.parameters())
                + sum(w.nbytes for w in model.quantized_weights().values()))

    def run(self, prompt_ids: list[int], new_tokens: int):
        return clocked(self.llm.generate_ids([prompt_ids], row_params(1, 0, temperature=0.0), new_tokens,
                                             stop_at_eos=False))


class LiteEngine:
    """llama_fast's torch-free fast start (llama_fast.lite, what `llama-fast generate` runs): no torch in
    the worker, so its peak RSS is the model's alone."""

    def __init__(self, dtype: str):
        from llama_fast.lite import LiteLLM

        self.llm = LiteLLM.open("smollm2-135m-instruct", dtype)
        if self.llm is None:
            raise RuntimeError("the fast start does not apply (no cache entry, or LLAMA_FAST_* set)")

    def weight_bytes(self) -> int:
        return sum(memoryview(data).nbytes for data, _, _ in self.llm.tensors.values())

    def run(self, prompt_ids: list[int], new_tokens: int):
        return clocked(self.llm.generate_ids(prompt_ids, row_params(1, 0, temperature=0.0)[0], new_tokens,
                                             stop_at_eos=False))


class TransformersEngine:
    def __init__(self, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM, GgufConfig

        from llama_fast.loaders import resolve_model_path

        # Dense weights in `dtype`, as llama_fast holds them: transformers would otherwise keep the GGUF's
        # quantized blocks and dequantize inside every matmul.
        path = resolve_model_path("smollm2-135m-instruct")
        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=getattr(torch, dtype),
            quantization_config=GgufConfig(dequantize=True)).eval()

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def run(self, prompt_ids, new_tokens):
        import torch
        from transformers.generation.streamers import BaseStreamer

        stamps = []

        class Clock(BaseStreamer):
            def put(self, value):
                stamps.append(time.perf_counter() - start)

            def end(self):
                pass

        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([prompt_ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, streamer=Clock())
        return out[0, len(prompt_ids):].tolist(), stamps[1:]  # the streamer's first put is the prompt


class LlamaCppEngine:
    def __init__(self, gguf_type: str, threads: int):
        from llama_cpp import Llama

        self.path = gguf_copy(gguf_type)
        self.llm = Llama(self.path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)

    def weight_bytes(self) -> int:
        from gguf import GGUFReader

        return sum(int(t.n_bytes) for t in GGUFReader(self.path).tensors)

    def run(self, prompt_ids, new_tokens):
        self.llm.reset()
        tokens = self.llm.generate(prompt_ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
        return clocked([token] for token in itertools.islice(tokens, new_tokens))


def gguf_copy(gguf_type: str) -> str:
    """The embedded GGUF rewritten with every tensor as gguf_type (F32, F16, BF16), or every matrix in a block
    format (`llama-fast quantize`'s file: Q8_0, Q4_0, Q4_K, Q6_K), made once; Q4_1: the original."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

    from llama_fast.loaders import quantize_gguf, resolve_model_path

    original = resolve_model_path("smollm2-135m-instruct")
    if gguf_type == "Q4_1":
        return original
    target = os.path.join(CACHE, f"smollm2-135m-instruct.{gguf_type}.gguf")
    if os.path.exists(target):
        return target
    os.makedirs(CACHE, exist_ok=True)
    if gguf_type not in FLOAT_GGUF_TYPES.values():
        quantize_gguf(original, target, gguf_type.lower(), progress=False)
        return target
    qtype = GGMLQuantizationType[gguf_type]
    reader = GGUFReader(original)
    writer = GGUFWriter(target + ".tmp", reader.fields["general.architecture"].contents())
    file_type = {"F32": 0, "F16": 1, "BF16": 32}[gguf_type]
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        value = file_type if field.name == "general.file_type" else field.contents()
        kind = field.types[0]
        writer.add_key_value(field.name, value, kind, sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        values = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        keep = qtype if values.ndim > 1 and values.shape[-1] > 1 else GGMLQuantizationType.F32  # norms stay F32
        writer.add_tensor(t.name, quants.quantize(values, keep), raw_dtype=keep)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(target + ".tmp", target)
    return target


# ----------------------------------------------------------------------------------------------------
# Worker processes

def make_engine(spec: dict, threads: int):
    kind = spec["kind"]
    if kind == "llama_fast":
        return LlamaFastEngine(spec["dtype"], spec.get("backend"))
    if kind == "lite":
        return LiteEngine(spec["dtype"])
    if kind == "transformers":
        return TransformersEngine(spec["dtype"])
    return LlamaCppEngine(spec["gguf_type"], threads)


def worker(spec: dict, threads: int, prompt_ids: list[int], new_tokens: int, ttft_repeats: int, conn) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)  # before any OpenMP runtime starts
    if spec["kind"] != "lite":
        import torch

        torch.set_num_threads(threads)
    try:
        engine = make_engine(spec, threads)
        engine.run(prompt_ids[:16], 4)  # warm-up: first-call allocations and lazy init
        conn.send({"ready": True, "weight_bytes": engine.weight_bytes()})
        while conn.recv() == "run":
            ids, stamps = engine.run(prompt_ids, new_tokens)
            # A first token is one sample of a noisy machine: a few more requests of one token each.
            ttft = [stamps[0]] + [engine.run(prompt_ids, 1)[1][0] for _ in range(ttft_repeats)]
            conn.send({"ids": ids, "stamps": stamps, "ttft": ttft, "peak_rss": peak_rss_bytes()})
    except Exception as err:  # report, so the parent can skip this engine and go on
        conn.send({"error": f"{type(err).__name__}: {err}"})


def interleaved_times(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each of `runs` (name -> callable taking the round number), the runs taking turns for
    `repeats` rounds, so a noisy machine's drift hits them alike."""
    times = {name: [] for name in runs}
    for i in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(i)
            times[name].append(time.perf_counter() - start)
    return times


def memory_bandwidth(threads: int, repeats: int = 5) -> dict[str, float]:
    """Bytes per second, best of `repeats`, over a 256 MiB fp32 tensor (far beyond the caches) on `threads`
    threads: "copy" (a copy, read + write bytes counted: the floor's reference) and "read" (a sum: the most a
    decode step, which only reads, could stream on this machine)."""
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(256 * 2**20 // 4)
    dst = torch.empty_like(src)
    times = interleaved_times({"copy": lambda i: dst.copy_(src), "read": lambda i: src.sum()}, repeats)
    nbytes = src.numel() * 4
    return {"copy": 2 * nbytes / min(times["copy"]), "read": nbytes / min(times["read"])}


def cold_start(prompt: str, lite: bool = True, repeats: int = 3) -> float:
    """Median seconds from `llama-fast generate` invocation to its first printed byte; lite=False makes the
    command take the torch engine (LLAMA_FAST_LITE=0) instead of its torch-free fast start."""
    exe = os.path.join(os.path.dirname(sys.executable), "llama-fast")
    env = {**os.environ, "LLAMA_FAST_LITE": "1" if lite else "0"}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.Popen([exe, "generate", prompt, "--max-new-tokens", "4"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, cwd=os.path.dirname(REPO), env=env)
        proc.stdout.read(1)
        times.append(time.perf_counter() - start)
        proc.communicate()
    return statistics.median(times)


def summarise(name, spec, runs, weight_bytes, bandwidth):
    ttft = [t for r in runs for t in r["ttft"]]
    gaps = [b - a for r in runs for a, b in zip(r["stamps"], r["stamps"][1:])]
    decode_tps = [(len(r["stamps"]) - 1) / (r["stamps"][-1] - r["stamps"][0]) for r in runs]
    floor_tps = bandwidth["copy"] / weight_bytes
    best = max(decode_tps)
    return {
        "engine": name, **spec, "runs": len(runs), "ttft_ms": 1000 * statistics.median(ttft),
        "decode_tok_s": best, "decode_tok_s_median": statistics.median(decode_tps),
        "ms_per_token_p50": 1000 * statistics.median(gaps), "ms_per_token_p99": 1000 * sorted(gaps)[int(0.99 * (len(gaps) - 1))],
        "peak_rss_mib": max(r["peak_rss"] for r in runs) / 2**20, "weight_mib": weight_bytes / 2**20,
        "floor_tok_s": floor_tps, "fraction_of_floor": best / floor_tps,
        "fraction_of_read": best * weight_bytes / bandwidth["read"], "tokens": runs[-1]["ids"],
    }


def default_out() -> str:
    """benchmarks/out of the checkout this module runs from, or ./llama_fast_bench once installed."""
    checkout_benchmarks = os.path.join(REPO, "benchmarks")
    return os.path.join(checkout_benchmarks, "out") if os.path.isdir(checkout_benchmarks) else "llama_fast_bench"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="llama-fast bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPE_BYTES) + list(BLOCK_TYPES),
                        help="float dtypes (the embedded model converted) and GGUF block formats (the embedded model "
                             "quantized by `llama-fast quantize`; q4_1 is the file as shipped)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ttft-repeats", type=int, default=4,
                        help="one-token requests per round and engine after the full run (TTFT: median of all)")
    parser.add_argument("--engines", nargs="+",
                        default=["llama_fast", "llama_fast-lite", "llama_fast-reference", "transformers", "llama.cpp"])
    parser.add_argument("--prompt-file", default=PROMPT_FILE, help="the prompt's text (its first tokens are used)")
    parser.add_argument("--out", default=default_out(), help="report folder (default: benchmarks/out in a checkout, "
                        "else ./llama_fast_bench)")
    args = parser.parse_args(argv)
    if not os.path.exists(args.prompt_file):
        parser.error(f"no prompt file {args.prompt_file}")

    import torch

    from llama_fast.loaders import load_checkpoint

    tokenizer = load_checkpoint("smollm2-135m-instruct", progress=False).tokenizer
    with open(args.prompt_file, encoding="utf-8") as f:
        prompt_ids = tokenizer.encode(f.read())[: args.prompt_tokens]

    specs = {}
    for dtype in args.dtypes:
        block = dtype in BLOCK_TYPES
        if block:
            gguf_copy(dtype.upper())  # the file both engines read, written once
        elif any(e.startswith("llama_fast") for e in args.engines):
            # The converted checkpoint's cache entry for this dtype, made here once: not in a worker's peak RSS.
            load_checkpoint("smollm2-135m-instruct", progress=False, dtype=getattr(torch, dtype))
        if "llama_fast" in args.engines:
            specs[f"llama_fast {dtype}"] = {"kind": "llama_fast", "dtype": dtype}
        if "llama_fast-lite" in args.engines and not block:
            specs[f"llama_fast lite {dtype}"] = {"kind": "lite", "dtype": dtype}
        if "llama_fast-reference" in args.engines and not block:
            specs[f"llama_fast reference {dtype}"] = {"kind": "llama_fast", "dtype": dtype, "backend": "reference"}
        if "transformers" in args.engines and not block:
            specs[f"transformers eager {dtype}"] = {"kind": "transformers", "dtype": dtype}
    if "llama.cpp" in args.engines:
        try:
            import llama_cpp  # noqa: F401

            wanted = [FLOAT_GGUF_TYPES.get(d, d.upper()) for d in args.dtypes]
            for gguf_type in wanted + ["F16", "Q4_1"]:
                specs.setdefault(f"llama.cpp {gguf_type}", {"kind": "llama.cpp", "gguf_type": gguf_type})
        except ImportError:
            print("llama-cpp-python is not installed: no llama.cpp columns (pip install -e .[bench])", file=sys.stderr)

    ctx = mp.get_context("spawn")
    workers = {}
    for name, spec in specs.items():
        if spec["kind"] == "llama.cpp":
            gguf_copy(spec["gguf_type"])  # written once, before any timing
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(spec, args.threads, prompt_ids, args.new_tokens, args.ttft_repeats, child), daemon=True)
        proc.start()
        reply = parent.recv()  # one at a time: loading in parallel would skew nothing but take the memory
        if "error" in reply:
            print(f"{name}: skipped ({reply['error']})", file=sys.stderr)
            proc.join()
            continue
        workers[name] = (proc, parent, reply["weight_bytes"])
        print(f"{name}: ready", file=sys.stderr)

    before = memory_bandwidth(args.threads)
    runs = {name: [] for name in workers}
    names = list(workers)
    for r in range(args.rounds):
        # Interleaved: every engine once per round, each round starting one engine later (no engine always
        # runs first, right after the copy-bandwidth test or another engine's threads).
        for name in names[r % len(names):] + names[:r % len(names)]:
            conn = workers[name][1]
            conn.send("run")
            runs[name].append(conn.recv())
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    for proc, conn, _ in workers.values():
        conn.send("stop")
        proc.join()
    # The machine's bandwidth drifts over a run: its best, measured before and after the rounds.
    bandwidth = {kind: max(before[kind], after) for kind, after in memory_bandwidth(args.threads).items()}

    results = [summarise(n, specs[n], runs[n], workers[n][2], bandwidth) for n in workers]
    cold, cold_engine = cold_start("Once upon a time"), cold_start("Once upon a time", lite=False)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs", "threads": args.threads, "copy_bandwidth_gb_s": bandwidth["copy"] / 1e9,
              "read_bandwidth_gb_s": bandwidth["read"] / 1e9,
              "prompt_tokens": len(prompt_ids), "new_tokens": args.new_tokens, "cold_start_s": cold,
              "cold_start_engine_s": cold_engine, "engines": results}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_decode.json"), "w") as f:
        json.dump(report, f, indent=1)
    print_table(report)
    plot(report, os.path.join(args.out, "bench_decode.png"))


def print_table(report):
    print(f"\n{report['date']}, {report['machine']}, {report['threads']} threads, copy bandwidth "
          f"{report['copy_bandwidth_gb_s']:.1f} GB/s (read {report['read_bandwidth_gb_s']:.1f} GB/s), prompt "
          f"{report['prompt_tokens']} tokens, "
          f"{report['new_tokens']} new tokens, greedy; cold start to first token {report['cold_start_s']:.2f} s "
          f"(through the torch engine: {report['cold_start_engine_s']:.2f} s)\n")
    print("| engine | TTFT ms | decode tok/s | ms/token p50 | p99 | peak RSS MiB | weights MiB | floor tok/s | of floor "
          "| of read |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for e in report["engines"]:
        print(f"| {e['engine']} | {e['ttft_ms']:.0f} | {e['decode_tok_s']:.1f} | {e['ms_per_token_p50']:.1f} | "
              f"{e['ms_per_token_p99']:.1f} | {e['peak_rss_mib']:.0f} | {e['weight_mib']:.0f} | {e['floor_tok_s']:.0f} | "
              f"{100 * e['fraction_of_floor']:.0f}% | {100 * e['fraction_of_read']:.0f}% |")
    engines = {e["engine"]: e for e in report["engines"]}
    for dtype in list(DTYPE_BYTES) + list(BLOCK_TYPES):
        ours, hf = engines.get(f"llama_fast {dtype}"), engines.get(f"transformers eager {dtype}")
        if ours and hf:
            same = ours["tokens"] == hf["tokens"]
            print(f"\n{dtype}: llama_fast / transformers eager decode = {ours['decode_tok_s'] / hf['decode_tok_s']:.2f}x, "
                  f"TTFT ratio {ours['ttft_ms'] / hf['ttft_ms']:.2f}; same greedy tokens: {same}")
        cpp = engines.get("llama.cpp " + FLOAT_GGUF_TYPES.get(dtype, dtype.upper()))
        if ours and cpp:
            print(f"{dtype}: llama_fast / llama.cpp decode = {ours['decode_tok_s'] / cpp['decode_tok_s']:.2f}x, TTFT "
                  f"ratio {ours['ttft_ms'] / cpp['ttft_ms']:.2f}; same greedy tokens: {ours['tokens'] == cpp['tokens']}")
        lite = engines.get(f"llama_fast lite {dtype}")
        if ours and lite:
            print(f"{dtype}: llama_fast lite / llama_fast decode = {lite['decode_tok_s'] / ours['decode_tok_s']:.2f}x; "
                  f"same greedy tokens: {lite['tokens'] == ours['tokens']}")


def save_chart(fig, ax, path: str, title: str, xlabel: str, ylabel: str) -> None:
    """A benchmark's chart finished (labels, grid, legend, tight layout) and written to `path`."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = report["engines"]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(engines) + 1.5))
    names = [e["engine"] for e in engines]
    ax.barh(names, [e["decode_tok_s"] for e in engines], color="tab:blue", label="decode tokens/s")
    ax.scatter([e["floor_tok_s"] for e in engines], names, color="tab:red", marker="|", s=300, label="bandwidth floor")
    ax.set_xlabel("tokens/s (batch 1, greedy)")
    ax.set_title(f"SmolLM2-135M decode, {report['machine']}, {report['threads']} threads")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
