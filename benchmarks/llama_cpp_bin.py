"""llama.cpp's own programs as the benchmarks' peer: `llama-batched-bench` (aggregate prefill and decode
tokens/s at several batch sizes) and `llama-server` (OpenAI-compatible, continuous batching over
--parallel slots), built by scripts/build_llama_cpp.sh.

    from llama_cpp_bin import LlamaServer, batched_bench   # benchmarks/ is on sys.path for its scripts
    from llama_fast.bench import gguf_copy
    rows = batched_bench(gguf_copy("F32"), [1, 2, 4], prompt_tokens=128, new_tokens=128, threads=2)
    with LlamaServer(gguf_copy("BF16"), parallel=4, ctx_per_slot=512, threads=2) as server:
        ...  # POST server.url + "/v1/completions"

The module is not named llama_cpp: benchmarks/ comes first on sys.path when its scripts run, and that name
would hide the llama-cpp-python binding that llama_fast.bench imports.
"""
from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from llama_fast.bench import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_SCRIPT = os.path.join(REPO, "scripts", "build_llama_cpp.sh")


class LlamaCppError(RuntimeError):
    """A llama.cpp program is missing, failed, or printed something other than what was asked for."""


def bin_dir() -> str:
    """The folder holding llama.cpp's programs: $LLAMA_CPP_BIN, else where scripts/build_llama_cpp.sh
    builds them (the script owns that path: the cache folder and the pinned version)."""
    if os.environ.get("LLAMA_CPP_BIN"):
        return os.environ["LLAMA_CPP_BIN"]
    done = subprocess.run(["bash", BUILD_SCRIPT, "--where"], capture_output=True, text=True)
    if done.returncode != 0:
        raise LlamaCppError(f"{BUILD_SCRIPT} --where failed: {done.stderr.strip()}")
    return done.stdout.strip()


def program(name: str) -> str:
    """The path of llama.cpp's program `name` (e.g. "llama-server"); LlamaCppError telling how to build
    it when it is not there."""
    folder = bin_dir()
    path = os.path.join(folder, name)
    if not os.access(path, os.X_OK):
        where = "$LLAMA_CPP_BIN" if os.environ.get("LLAMA_CPP_BIN") else "the build folder"
        raise LlamaCppError(f"llama.cpp's {name} is not in {where} {folder}: run `bash scripts/build_llama_cpp.sh` "
                            "(builds it once, 15-25 minutes on 2 cores) or set $LLAMA_CPP_BIN to a folder holding it")
    return path


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _existing_file(name: str, path) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise ValueError(f"{name} must be an existing GGUF file, got {path!r}")
    return os.fspath(path)


# ----------------------------------------------------------------------------------------------------
# llama-batched-bench

def batched_bench_command(gguf_path: str, batch_sizes, prompt_tokens: int, new_tokens: int, threads: int) -> list[str]:
    """The llama-batched-bench command line: every batch size with its own prompts (no -pps, so prefill is
    B * prompt_tokens tokens), the context exactly large enough for the largest batch (the program skips,
    without a word, every batch whose B * (P + G) tokens do not fit), and JSONL output."""
    gguf_path = _existing_file("gguf_path", gguf_path)
    if not isinstance(batch_sizes, (list, tuple)) or not batch_sizes:
        raise ValueError(f"batch_sizes must be a non-empty list of positive ints, got {batch_sizes!r}")
    batch_sizes = [_positive_int("batch_sizes", b) for b in batch_sizes]
    if len(set(batch_sizes)) != len(batch_sizes):
        raise ValueError(f"batch_sizes must not repeat a size, got {batch_sizes!r}")
    prompt_tokens = _positive_int("prompt_tokens", prompt_tokens)
    new_tokens = _positive_int("new_tokens", new_tokens)
    threads = _positive_int("threads", threads)
    context = max(batch_sizes) * (prompt_tokens + new_tokens)
    return [program("llama-batched-bench"), "-m", gguf_path, "-c", str(context),
            "-npp", str(prompt_tokens), "-ntg", str(new_tokens), "-npl", ",".join(map(str, batch_sizes)),
            "-t", str(threads), "-tb", str(threads), "--output-format", "jsonl"]


def parse_batched_bench(output: str, batch_sizes, prompt_tokens: int, new_tokens: int) -> dict[int, dict]:
    """{B: row} from llama-batched-bench's JSONL lines (its log lines around them are skipped). Each row:
    pp_tps (prefill tokens/s over the B prompts), tg_tps (aggregate decode tokens/s: B * G / decode time),
    tps (all tokens over all time), pp_s, tg_s, n_kv, threads, flash_attn. LlamaCppError when a size asked
    for is missing, a row is for another size or shape, or a size appears twice."""
    rows: dict[int, dict] = {}
    for line in output.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlamaCppError(f"llama-batched-bench printed a JSON line that does not parse ({e}): {line!r}") from None
        if "pl" not in record:
            continue
        size = record["pl"]
        if size not in batch_sizes or record["pp"] != prompt_tokens or record["tg"] != new_tokens:
            raise LlamaCppError(f"llama-batched-bench printed a row for B={size}, P={record['pp']}, "
                                f"G={record['tg']}; asked for B in {list(batch_sizes)}, P={prompt_tokens}, G={new_tokens}")
        if size in rows:
            raise LlamaCppError(f"llama-batched-bench printed two rows for B={size}")
        rows[size] = {"pp_tps": record["speed_pp"], "tg_tps": record["speed_tg"], "tps": record["speed"],
                      "pp_s": record["t_pp"], "tg_s": record["t_tg"], "n_kv": record["n_kv"],
                      "threads": record["n_threads"], "flash_attn": record["flash_attn"]}
    missing = [b for b in batch_sizes if b not in rows]
    if missing:
        raise LlamaCppError(f"llama-batched-bench printed no row for B={missing} (context too small?)")
    return {b: rows[b] for b in batch_sizes}


def batched_bench(gguf_path: str, batch_sizes, prompt_tokens: int, new_tokens: int, threads: int,
                  timeout: float = 3600) -> dict[int, dict]:
    """Runs llama-batched-bench on gguf_path: for each B, B sequences of prompt_tokens random tokens
    prefilled, then new_tokens decode steps of B tokens each. {B: {"pp_tps", "tg_tps", ...}} (see
    parse_batched_bench)."""
    command = batched_bench_command(gguf_path, batch_sizes, prompt_tokens, new_tokens, threads)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LlamaCppError(f"llama-batched-bench ran past timeout={timeout} s: {' '.join(command)}") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise LlamaCppError(f"llama-batched-bench exited with {done.returncode}: {' '.join(command)}\n{tail}")
    return parse_batched_bench(done.stdout, batch_sizes, prompt_tokens, new_tokens)


# ----------------------------------------------------------------------------------------------------
# llama-server

def _die_with_parent() -> None:
    """Runs in the child before exec: on Linux, SIGTERM it when the process that started it dies, so even
    a SIGKILLed benchmark leaves no server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class LlamaServer:
    """llama-server on a free loopback port, from `with` until its end (also on exceptions): `parallel`
    slots of `ctx_per_slot` tokens each (the server splits -c evenly between them), `threads` threads.
    `url` is its base address ("http://127.0.0.1:PORT"); `extra_args` go on its command line as given."""

    def __init__(self, gguf_path: str, parallel: int = 1, ctx_per_slot: int = 512, threads: int = 1,
                 startup_timeout: float = 120, extra_args=()):
        self.gguf_path = _existing_file("gguf_path", gguf_path)
        self.parallel = _positive_int("parallel", parallel)
        self.ctx_per_slot = _positive_int("ctx_per_slot", ctx_per_slot)
        self.threads = _positive_int("threads", threads)
        if not isinstance(startup_timeout, (int, float)) or startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be a positive number of seconds, got {startup_timeout!r}")
        self.startup_timeout = startup_timeout
        if isinstance(extra_args, str) or not all(isinstance(a, str) for a in extra_args):
            raise ValueError(f"extra_args must be a sequence of str, got {extra_args!r}")
        self.extra_args = list(extra_args)
        self.port = None
        self.process = None
        self._log = collections.deque(maxlen=40)   # the server's last output lines, for error messages

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [program("llama-server"), "-m", self.gguf_path, "--host", "127.0.0.1", "--port", str(self.port),
                "--parallel", str(self.parallel), "-c", str(self.parallel * self.ctx_per_slot),
                "-t", str(self.threads), "-tb", str(self.threads), *self.extra_args]

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(list(self._log)[-lines:])

    def __enter__(self) -> "LlamaServer":
        self.port = free_port()
        self.process = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        errors="replace", preexec_fn=_die_with_parent)
        # A thread drains its output (a full pipe would block the server) and keeps the last lines.
        threading.Thread(target=self._drain, args=(self.process.stdout,), daemon=True).start()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _drain(self, stream) -> None:
        for line in stream:
            self._log.append(line.rstrip("\n"))

    def health(self) -> str | None:
        """GET /health: its "status" ("ok" once the model is loaded), or None while nothing answers."""
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return json.loads(response.read()).get("status")
        except urllib.error.HTTPError as e:   # 503 while loading, with a JSON error body
            return f"http {e.code}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            return None

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the drain thread read the last lines
                raise LlamaCppError(f"llama-server exited with {self.process.returncode} before it was ready: "
                                    f"{' '.join(self.process.args)}\n{self.log_tail()}")
            status = self.health()
            if status == "ok":
                return
            if time.monotonic() > deadline:
                raise LlamaCppError(f"llama-server did not answer /health with ok within startup_timeout="
                                    f"{self.startup_timeout} s (last answer: {status})\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, grace: float = 10) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds; waits for the process to be gone."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ----------------------------------------------------------------------------------------------------
# Command line: llama.cpp's aggregate decode rate by batch size on the embedded model.

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown CPU"


def main(argv=None) -> None:
    import argparse

    from llama_fast.bench import gguf_copy

    parser = argparse.ArgumentParser(description="llama-batched-bench on the embedded model's GGUF copies: "
                                     "prefill and aggregate decode tokens/s per batch size")
    parser.add_argument("--types", nargs="+", default=["F32", "BF16"], choices=["F32", "F16", "BF16", "Q4_1"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    print(f"llama-batched-bench ({bin_dir()}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {_cpu_name()}, "
          f"-npp {args.prompt_tokens} -ntg {args.new_tokens} -t {args.threads}")
    report = {}
    for gguf_type in args.types:
        rows = batched_bench(gguf_copy(gguf_type), args.batch_sizes, args.prompt_tokens, args.new_tokens, args.threads)
        report[gguf_type] = rows
        flash_attn = {-1: "auto", 0: "off", 1: "on"}.get(rows[args.batch_sizes[0]]["flash_attn"])
        print(f"\n{gguf_type} (flash attention: {flash_attn})\n")
        print("| B | prefill tok/s | decode tok/s (all rows) | decode tok/s per row |")
        print("|--:|--:|--:|--:|")
        for size, row in rows.items():
            print(f"| {size} | {row['pp_tps']:.1f} | {row['tg_tps']:.1f} | {row['tg_tps'] / size:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
