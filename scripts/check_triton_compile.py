#!/usr/bin/env python3
"""GPU-free compile check of every Triton kernel configuration the dispatcher can pick (docs/ARCHITECTURE.md section 7).

For each kernel configuration and each target (sm_90 and sm_80) it runs triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32)) down to a cubin, reads ptxas's own report (registers, spill stores and
loads), Triton's shared memory use, and the tensor-core instructions in the SASS (the cuobjdump bundled in
Triton's wheel). Prints one table; exits 1 on a compile error, a register spill, shared memory above the
chip's limit (sm_90: 232448 B, sm_80: 166912 B), or an attention or quantized GEMM kernel without HGMMA/HMMA.

Configurations (the dispatcher's own config functions decide block sizes and warps):
  attention kernels: dtype {fp16, bf16} x head-dim tile {64 (D=64), 128 (D=80, 96, 128)} x span variants
  {none, alibi, buckets, window, window + sinks, softcap, all (sinks included)} x layouts (prefill: batched, varlen,
  contiguous cache, paged cache; decode: contiguous, paged x query-row tiles 16/32/64 x one/many splits).
  The default (CI) set takes every value of every dimension in the combinations that bound registers and
  shared memory (see configs()); --full compiles the complete product (about 4x as many builds).
  quantized matmuls (quant_matmul.py): dtype {fp16, bf16} x {int8, int4 with groups of 32 and 128} x
  {matrix-vector kernel, each GEMM tile}, with the split-K epilogue on fp16, and the fp32 matrix-vector
  kernels (fp32 takes them at every M; see _quant_configs()).
  Results are cached per kernel source and configuration in .cache/triton_compile_check.json, so an
  unchanged kernel is not rebuilt.

Run: .venv/bin/python scripts/check_triton_compile.py [--full] [--jobs N] [--no-cache]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMEM_LIMIT = {90: 232448, 80: 166912}
CACHE_FILE = ROOT / ".cache" / "triton_compile_check.json"

SPANS = {  # name -> (HAS_ALIBI, HAS_TABLE, HAS_WINDOW, HAS_SINKS, HAS_SOFTCAP)
    "none": (False, False, False, False, False),
    "alibi": (True, False, False, False, False),
    "buckets": (False, True, False, False, False),
    "window": (False, False, True, False, False),
    "sinks": (False, False, True, True, False),
    "softcap": (False, False, False, False, True),
    "all": (True, True, True, True, True),
}


def _span_flags(name):
    a, t, w, k, s = SPANS[name]
    return dict(HAS_ALIBI=a, HAS_TABLE=t, HAS_WINDOW=w, HAS_SINKS=k, HAS_SOFTCAP=s)


def configs(full: bool):
    """[(label, kernel key, constexprs, options, dtype)] of what the dispatcher can launch.

    full=False (CI): every value of every dimension, in the combinations that bound register and shared
    memory use: the heaviest span ("all": every feature on) on every layout and tile, each span variant on
    the plain layout, bf16 (the same code with another MMA type) on the heaviest combinations.
    """
    import torch

    from llama_fast.kernels.decode_attention import MAX_DECODE_ROWS, decode_config
    from llama_fast.kernels.span_attention import MODE_BATCHED, MODE_CACHE, MODE_VARLEN, prefill_config

    out = []
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    layouts = [("batched", MODE_BATCHED, False), ("varlen", MODE_VARLEN, False),
               ("cache", MODE_CACHE, False), ("paged", MODE_CACHE, True)]

    def prefill_wanted(dname, span, layout, head_dim):
        if full:
            return True
        if dname == "bf16":  # same code as fp16 with another MMA type: the heaviest span, two layouts
            return span == "all" and layout in ("batched", "paged")
        return span == "all" or layout == "batched"  # fp16: all on every layout, each variant plainly

    def decode_wanted(dname, span, paged, rows, single, head_dim):
        if full:
            return True
        if dname == "bf16":
            return span == "all" and rows == MAX_DECODE_ROWS and not single
        if span == "all" and not single:  # every row tile, both layouts, with the split epilogue
            return True
        # each span variant on plain decoding (Tq = 1: 16-row tile, one split, contiguous) at D=128
        return not paged and rows == 16 and single and head_dim == 128

    for dname, dtype in dtypes.items():
        for head_dim in (64, 128):  # tiles: D=64 -> 64; D=80, 96, 128 -> 128
            for span in SPANS:
                a, t, w, _, s = SPANS[span]
                cfg = prefill_config(dtype, head_dim, heavy_span=t or w or s)
                for lname, mode, paged in layouts:
                    if not prefill_wanted(dname, span, lname, head_dim):
                        continue
                    const = dict(MODE=mode, PAGED=paged, **_span_flags(span), BLOCK_M=cfg["BLOCK_M"],
                                 BLOCK_N=cfg["BLOCK_N"], BLOCK_D=head_dim, DOT_PRECISION="tf32", COUNT=False)
                    out.append((f"prefill {dname} D{head_dim} {span} {lname}", "prefill", const,
                                dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]), dname))
            for rows in (16, 32, MAX_DECODE_ROWS):
                cfg = decode_config(dtype, rows)
                for span in SPANS:
                    for paged in (False, True):
                        for single in (True, False):
                            if not decode_wanted(dname, span, paged, rows, single, head_dim):
                                continue
                            const = dict(PAGED=paged, **_span_flags(span), BLOCK_M=cfg["BLOCK_M"],
                                         BLOCK_N=cfg["BLOCK_N"], BLOCK_D=head_dim, DOT_PRECISION="tf32",
                                         SINGLE=single, COUNT=False)
                            lname = ("paged" if paged else "contig") + (" 1split" if single else " splits")
                            out.append((f"decode {dname} D{head_dim} M{cfg['BLOCK_M']} {span} {lname}", "decode",
                                        const, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
                                        dname))
            for splits_p2 in (2, 4, 8, 16, 32, 64):
                if full or splits_p2 == 64:
                    out.append((f"combine {dname} D{head_dim} splits<={splits_p2}", "combine",
                                dict(SPLITS_P2=splits_p2, BLOCK_D=head_dim), dict(num_warps=4), dname))
        for block in (1024, 2048, 4096, 8192):  # rms_norm: hidden sizes up to 8192
            if not full and block not in (1024, 8192):
                continue
            warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
            for res in (False, True):
                out.append((f"rms_norm {dname} N<={block} residual={res}", "rms_norm",
                            dict(HAS_RESIDUAL=res, BLOCK=block), dict(num_warps=warps), dname))
        for bh, bhalf in ((16, 32), (16, 64)):
            out.append((f"rope {dname} half<={bhalf}", "rope", dict(BLOCK_H=bh, BLOCK_HALF=bhalf), dict(num_warps=4),
                        dname))
        out.append((f"swiglu {dname}", "swiglu", dict(BLOCK=1024), dict(num_warps=4), dname))
        out += _quant_configs(dname, full)
    return out + _quant_configs("fp32", full)


def _quant_configs(dname: str, full: bool):
    """int8 / int4 weight-only matmuls: the matrix-vector kernel (M = 1, and fp32 at any M) and each GEMM tile
    (M > 1, fp16 / bf16), each int4 group size. The split-K epilogue (SPLIT) only changes the final store: CI
    builds it for fp16."""
    from llama_fast.kernels.quant_matmul import GEMV_INT4, GEMV_INT8, GROUP_SIZES, gemm_config

    out = []
    # int4: the scales and zeros from quantize_int4 have N fastest, a unit stride the JIT specialises to 1
    unit_n = dict(stride_sn=1, stride_zn=1)
    for split in (False, True):
        if split and not full and dname != "fp16":
            continue
        tag = " split" if split else ""
        g = GEMV_INT8
        out.append((f"int8 gemv {dname}{tag}", "int8_gemv",
                    dict(BLOCK_N=g["BLOCK_N"], BLOCK_K=g["BLOCK_K"], STAGES=g["STAGES"], SPLIT=split),
                    dict(num_warps=g["num_warps"]), dname))
        for group in GROUP_SIZES:
            g = GEMV_INT4
            out.append((f"int4 gemv {dname} g{group}{tag}", "int4_gemv",
                        dict(GROUP=group, BLOCK_N=g["BLOCK_N"], BLOCK_G=g["BLOCK_K"] // group, STAGES=g["STAGES"],
                             SPLIT=split, **unit_n), dict(num_warps=g["num_warps"]), dname))
        for rows in (16, 64, 128) if dname != "fp32" else ():  # one M per gemm_config tile
            cfg = gemm_config(rows)
            opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            tile = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], SPLIT=split)
            out.append((f"int8 gemm {dname} M{cfg['BLOCK_M']}{tag}", "int8_gemm",
                        dict(BLOCK_K=cfg["BLOCK_K"], **tile), opts, dname))
            for group in GROUP_SIZES:
                out.append((f"int4 gemm {dname} g{group} M{cfg['BLOCK_M']}{tag}", "int4_gemm",
                            dict(GROUP=group, **tile, **unit_n), opts, dname))
    return out


# Pointer arguments and their element type ("T" = the data dtype); everything else not listed is i32.
POINTERS = {
    "prefill": {"Q": "T", "Q_sink": "T", "K": "T", "V": "T", "O": "T", "seq_ptr": "i32", "bt_ptr": "i32", "slopes_ptr": "fp32",
                "table_ptr": "fp32", "count_ptr": "i32"},
    "decode": {"Q": "T", "Q_sink": "T", "K": "T", "V": "T", "O": "T", "O_part": "fp32", "L_part": "fp32", "seq_ptr": "i32",
               "bt_ptr": "i32", "slopes_ptr": "fp32", "table_ptr": "fp32", "count_ptr": "i32"},
    "combine": {"O": "T", "O_part": "fp32", "L_part": "fp32"},
    "rms_norm": {"X": "T", "R": "T", "W": "T", "Y": "T", "NEW_R": "T"},
    "rope": {"Q": "T", "K": "T", "P": "i64", "CS": "fp32"},
    "swiglu": {"G": "T", "U": "T", "Y": "T"},
    "int8_gemv": {"X": "T", "W": "i8", "S": "fp32", "Y": "T", "P": "fp32"},
    "int4_gemv": {"X": "T", "W": "i32", "S": "fp16", "Z": "fp16", "Y": "T", "P": "fp32"},
    "int8_gemm": {"X": "T", "W": "i8", "S": "fp32", "Y": "T", "P": "fp32"},
    "int4_gemm": {"X": "T", "W": "u8", "S": "fp16", "Z": "fp16", "Y": "T", "P": "fp32"},
}
FLOATS = {"sm_scale", "softcap", "eps"}
QUANT_KERNELS = ("int8_gemv", "int4_gemv", "int8_gemm", "int4_gemm")
# Integer arguments that are multiples of 16 in every real launch, which Triton's JIT then specialises as
# such (it marks every int argument divisible by 16): the strides of head_dim-wide rows, head_dim itself
# (64, 80, 96, 128), the cache's block size (16, 32, ...), the hidden / rotary widths.
ALIGNED = re.compile(r"^stride_[qkvos][bth]$|^D$|^page_size$|^stride_(x|r|y|nr|cs)$")
# The quantized matmuls' model sizes (N, K: 4096, 11008, 14336, vocabularies ...) are multiples of 16, and
# so are the weight and activation row strides, the K range of a split, the group-major scale strides (N) and
# the constant 2^23's bit pattern.
ALIGNED_QUANT = {"N", "K", "stride_xm", "stride_wn", "k_per_split", "stride_sg", "stride_zg", "two_pow_23"}


def _kernel(key):
    import importlib

    mod = lambda name: importlib.import_module(f"llama_fast.kernels.{name}")  # noqa: E731 (not the functions)
    return {"prefill": lambda: mod("span_attention")._span_fwd_kernel,
            "decode": lambda: mod("decode_attention")._decode_kernel,
            "combine": lambda: mod("decode_attention")._combine_kernel,
            "rms_norm": lambda: mod("rms_norm")._rms_norm_kernel, "rope": lambda: mod("rope")._rope_kernel,
            "swiglu": lambda: mod("swiglu")._swiglu_kernel,
            **{k: lambda k=k: getattr(mod("quant_matmul"), f"_{k}_kernel") for k in QUANT_KERNELS}}[key]()


def _signature(fn, key, const, dtype):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in POINTERS[key]:
            t = POINTERS[key][name]
            sig[name] = "*" + (dtype if t == "T" else t)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if ALIGNED.match(name) or (key in QUANT_KERNELS and name in ALIGNED_QUANT):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_one(job):
    """Compiles one configuration for one target; returns a result row (runs in a worker process)."""
    label, key, const, options, dtype, cc = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(key)
    sig, attrs = _signature(fn, key, const, dtype)
    row = dict(label=label, cc=cc, error=None)
    t0 = time.time()
    log = io.StringIO()
    try:
        with contextlib.suppress(Exception):  # Triton >= 3.4: ptxas -v report printed by make_cubin
            triton.knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs),
                                    target=GPUTarget("cuda", cc, 32), options=options)
    except Exception as exc:  # noqa: BLE001 - a compile error is a result here
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return row
    text = log.getvalue()
    if "Used" not in text:  # Triton's cache answered, so ptxas did not run: run it the way Triton does
        text = _ptxas_report(kernel.asm["ptx"], cc)
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    row["regs"] = int(regs.group(1)) if regs else None
    row["spill"] = sum(spills)
    row["smem"] = int(kernel.metadata.shared)
    row["mma"] = _mma_kind(kernel.asm["cubin"])
    row["seconds"] = round(time.time() - t0, 1)
    if not text.strip():
        row["error"] = "no ptxas report captured"
    return row


def _ptxas_report(ptx: str, cc: int) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        result = subprocess.run([str(tool), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src),
                                 "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    return result.stdout + result.stderr


def _mma_kind(cubin: bytes) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    kinds = sorted(set(re.findall(r"\b(HGMMA|HMMA|IMMA|QGMMA)\b", sass)))
    return "+".join(kinds) if kinds else "-"


def _source_hash() -> str:
    h = hashlib.sha256()
    for path in sorted((ROOT / "kernels").glob("*.py")) + [Path(__file__)]:
        h.update(path.read_bytes())
    import triton

    h.update(triton.__version__.encode())
    return h.hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every combination, not the covering set")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--only", default="", help="compile only labels containing this text")
    args = parser.parse_args()
    # Triton must not be interpreted here, and no GPU is needed.
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]  # keep kernels/ off sys.path

    jobs = [(label, key, const, opts, dtype, cc) for cc in (90, 80)
            for label, key, const, opts, dtype in configs(args.full) if args.only in label]
    source = _source_hash()
    cache = {}
    if CACHE_FILE.exists() and not args.no_cache:
        with contextlib.suppress(Exception):
            cache = json.loads(CACHE_FILE.read_text())
    if cache.get("source") != source:
        cache = {"source": source, "rows": {}}

    def cache_key(job):
        return f"{job[0]} sm{job[5]} {json.dumps(job[3], sort_keys=True)}"

    todo = [j for j in jobs if cache_key(j) not in cache["rows"]]
    t0 = time.time()
    print(f"compile check: {len(jobs)} kernel builds ({len(jobs) - len(todo)} cached), {args.jobs} processes",
          flush=True)
    fresh = {}
    if todo:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for n, (job, row) in enumerate(zip(todo, pool.map(compile_one, todo)), 1):
                fresh[cache_key(job)] = row
                if n % 10 == 0 or n == len(todo):
                    print(f"  built {n}/{len(todo)} ({time.time() - t0:.0f} s)", flush=True)
                if row["error"] is None:  # only successes are cached: a failure is rebuilt next time
                    cache["rows"][cache_key(job)] = row
    rows = [fresh.get(cache_key(j)) or cache["rows"][cache_key(j)] for j in jobs]
    CACHE_FILE.parent.mkdir(exist_ok=True)
    CACHE_FILE.write_text(json.dumps(cache))

    failures = []
    header = f"{'kernel configuration':58} {'cc':>3} {'regs':>5} {'spill B':>7} {'smem B':>7} {'MMA':>10}  status"
    print(header)
    print("-" * len(header))
    for row in rows:
        problems = []
        if row["error"]:
            problems.append(row["error"][:120])
        else:
            if row["spill"]:
                problems.append(f"{row['spill']} bytes of register spills")
            if row["smem"] > SMEM_LIMIT[row["cc"]]:
                problems.append(f"shared memory {row['smem']} > {SMEM_LIMIT[row['cc']]}")
            if row["label"].startswith(("prefill", "decode", "int8 gemm", "int4 gemm")) and row["mma"] == "-":
                problems.append("no tensor-core MMA")
        status = "ok" if not problems else "FAIL: " + "; ".join(problems)
        if problems:
            failures.append((row["label"], row["cc"], status))
        if row["error"]:
            print(f"{row['label']:58} {row['cc']:>3} {'-':>5} {'-':>7} {'-':>7} {'-':>10}  {status}")
        else:
            print(f"{row['label']:58} {row['cc']:>3} {row['regs']:>5} {row['spill']:>7} {row['smem']:>7} "
                  f"{row['mma']:>10}  {status}")
    print(f"compile check: {len(rows)} builds, {len(failures)} failures, {time.time() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
