#!/usr/bin/env bash
# GPU suite: on a machine with an NVIDIA GPU, build everything, check the Triton kernels on the GPU
# (fp16, bf16 and fp32 against the fp64 reference), time them against SDPA / FlexAttention / the
# reference (the quantized matmuls against bf16 F.linear), and print a short table. Target: under 8
# minutes on one H100/H200.
#
# Uses the machine's own python3 with CUDA PyTorch and Triton (no downloads: GPU machines here are
# offline); PYTHON=... picks another. Everything it writes goes to benchmarks/out/ (and $OUT when set).
#
#   bash benchmarks/gpu_suite.sh            # full suite
#   QUICK=1 bash benchmarks/gpu_suite.sh    # fewer sizes
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUTDIR=benchmarks/out
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_suite.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
start=$(date +%s)
declare -A STATUS
step() {  # step NAME COMMAND...: runs, logs, records ok/FAIL with the time it took
    local name=$1; shift
    local t0=$(date +%s)
    echo "=== $name: $*" | tee -a "$LOG"
    if "$@" 2>&1 | tee -a "$LOG"; then STATUS[$name]="ok"; else STATUS[$name]="FAIL"; fi
    STATUS[$name]="${STATUS[$name]} ($(( $(date +%s) - t0 )) s)"
}

# 1. environment
step env "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__); assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$LOG" || true

# 2. build: the package with its extension (CUDA sources when torch has CUDA), in place. If the build
# fails, the kernels still run from a staged copy of the Python package (llama_fast + kernels).
STAGE=$(mktemp -d)
build() {
    MAX_JOBS=${MAX_JOBS:-16} "$PY" setup.py -q build_ext --inplace
}
step build build
mkdir -p "$STAGE/llama_fast"
cp -r llama_fast/. "$STAGE/llama_fast/"
rm -rf "$STAGE/llama_fast/kernels" && cp -r kernels "$STAGE/llama_fast/kernels"
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
cd "$STAGE"  # keep the repository root (and its top-level kernels/ folder) off sys.path
step import "$PY" -c "import llama_fast.kernels as k, llama_fast; print('kernels from', k.__file__); \
from llama_fast._ext import has_ext; print('extension built:', has_ext())"

# 3. compile check for this GPU's own target (registers, spills, shared memory, MMA kind), fp16 and bf16
step compile_check "$PY" "$ROOT/scripts/check_triton_compile.py" --jobs 8 --no-cache

# 4. correctness on the GPU: fp16, bf16, fp32 vs the fp64 reference (prefill, varlen, decode
#    contiguous/paged, Tq 1/4/200, rms_norm, rope, swiglu, int8 / int4 weight-only matmuls)
step correctness "$PY" "$ROOT/benchmarks/gpu_correctness.py" ${QUICK:+--quick}

# 4b. the extension's CUDA code (sampler, KV cache writes/copies) vs CPU and reference, and its speed
step ext_cuda "$PY" "$ROOT/benchmarks/gpu_ext_check.py" ${QUICK:+--quick}

# 4c. decode: CUDA-graph steps against eager steps (same tokens, steps/s at batch 1 and 8)
step decode_graphs "$PY" "$ROOT/benchmarks/gpu_decode.py" ${QUICK:+--new-tokens 64}

# 4d. the tests that need a GPU: graph decoding against eager, tensor parallelism over NCCL under graph
#     capture (one rank; two where the machine has two GPUs). Needs pytest on the machine's python.
step gpu_tests "$PY" -m pytest -q -p no:cacheprovider "$ROOT/tests/test_cuda_graphs.py" \
    "$ROOT/tests/test_tensor_parallel_cuda.py" -k "gpu or cuda"

# 5. benchmarks: bf16 (full or quick) and fp16 (quick)
step bench_bf16 "$PY" "$ROOT/benchmarks/bench_attention.py" --dtype bf16 ${QUICK:+--quick}
cp "$ROOT/$OUTDIR/bench_attention.json" "$ROOT/$OUTDIR/bench_attention_bf16.json" 2>/dev/null || true
step bench_fp16 "$PY" "$ROOT/benchmarks/bench_attention.py" --dtype fp16 --quick
cp "$ROOT/$OUTDIR/bench_attention.json" "$ROOT/$OUTDIR/bench_attention_fp16.json" 2>/dev/null || true
# 5b. weight-only int8 / int4 matmuls against bf16 F.linear, Llama-7B shapes at M = 1 and 128 (about a minute)
step bench_qmatmul "$PY" "$ROOT/benchmarks/bench_quant_matmul.py" ${QUICK:+--quick}
cd "$ROOT"
rm -rf "$STAGE"

# 6. summary
{
    echo
    echo "=== gpu_suite summary ($(( $(date +%s) - start )) s)"
    for name in env build import compile_check correctness ext_cuda decode_graphs gpu_tests bench_bf16 bench_fp16 bench_qmatmul; do
        printf '  %-14s %s\n' "$name" "${STATUS[$name]:-not run}"
    done
    echo "  tables: the bench_* steps above; JSON in $OUTDIR/bench_attention_{bf16,fp16}.json and" \
        "$OUTDIR/bench_quant_matmul.json"
} | tee -a "$LOG"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
    cp "$LOG" "$OUTDIR"/bench_attention_*.json "$OUTDIR"/gpu_decode.json "$OUTDIR"/bench_quant_matmul.json "$OUT"/ \
        2>/dev/null || true
fi
for name in env import compile_check correctness; do
    case "${STATUS[$name]:-}" in ok*) ;; *) exit 1 ;; esac
done
exit 0
