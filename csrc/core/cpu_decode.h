// The pieces of the CPU decode step (session.h runs them: embedding -> n_layers x (RMSNorm, QKV, RoPE,
// KV-cache append, span-biased GQA attention, output projection + residual, RMSNorm, SwiGLU MLP + residual)
// -> RMSNorm -> logits): the model description, the per-ISA kernels, the barrier. Torch-free.
//
// Decode is memory-bound (every weight is read once per token), so the matrix-vector products stream the
// weights (fp32, bf16 widened to fp32 in registers, or GGUF quantized blocks as stored, quant.h) with the
// widest vectors the CPU has, chosen at run time (the build has no -march flags): AVX-512 (with BF16 and
// VNNI where the CPU has them), AVX2+FMA, or plain C++. All activations are fp32 (quantized to int8 per
// block inside the products with quantized weights).
// One OpenMP parallel region per step: threads split each product by output rows (and attention by
// heads) and meet at a barrier only where the next op needs every row (5 per layer; SpinBarrier).
#pragma once

#include <immintrin.h>
#include <omp.h>

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "quant.h"

namespace llama_fast {
namespace cpu_decode {

// Round to nearest even, as torch's float -> bfloat16 conversion; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// The span bias of one query head (docs/ARCHITECTURE.md section 3).
struct HeadSpan {
  bool has_alibi = false;
  float slope = 0.0f;               // bias -= slope * d
  const float* buckets = nullptr;   // (max_distance + 1,): bias += buckets[min(d, max_distance)], or null
  int max_distance = 0;
  int window = 0;                   // 0: no window
  int sinks = 0;
  float softcap = 0.0f;             // 0: off
  float scale = 1.0f;
};

// The most query heads one attention call takes (heads of one KV group; larger groups go in parts).
constexpr int kMaxGroupHeads = 16;

// The most threads a step or op runs on: beyond it OpenMP's per-thread stacks exhaust memory (or wrap `int`).
constexpr int kMaxThreads = 1024;

// For the small reductions that end a tile: inlined, they work on the tile's registers; called (GCC declined
// to inline them into the prompt tiles), the tile's accumulators go through memory.
#define LF_INLINE __attribute__((always_inline))

// LF_NATIVE: the ISA multiplies bf16 natively (AVX512-BF16 vdpbf16ps), so bf16 weights use it; LF_VNNI: it has
// int8 dot products (AVX512-VNNI vpdpbusd) for quantized weights; 0 elsewhere. F16C converts the fp16 scales
// of quantized blocks (every AVX2 CPU has it).
#define LF_NS isa_avx512bf16
#define LF_W 16
#define LF_NATIVE 1
#define LF_VNNI 1
#define LF_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni,f16c")))
#include "cpu_decode_isa.inc"

#define LF_NS isa_avx512vnni
#define LF_W 16
#define LF_NATIVE 0
#define LF_VNNI 1
#define LF_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c")))
#include "cpu_decode_isa.inc"

#define LF_NS isa_avx512
#define LF_W 16
#define LF_NATIVE 0
#define LF_VNNI 0
#define LF_FN __attribute__((target("avx512f,avx512bw,f16c")))
#include "cpu_decode_isa.inc"

#define LF_NS isa_avx2
#define LF_W 8
#define LF_NATIVE 0
#define LF_VNNI 0
#define LF_FN __attribute__((target("avx2,fma,f16c")))
#include "cpu_decode_isa.inc"

#define LF_NS isa_scalar
#define LF_W 1
#define LF_NATIVE 0
#define LF_VNNI 0
#define LF_FN
#include "cpu_decode_isa.inc"

#include "amx.inc"

// Each level has every instruction of the ones below it. Avx512Vnni (Ice Lake, Cascade Lake and every CPU with
// AVX512-BF16) adds the int8 dot products of quantized weights (AVX512-VNNI, with AVX512-VL) to Avx512 (AVX-512
// F/BW); Avx512Bf16 (Zen 4, Sapphire Rapids, Cooper Lake) multiplies bf16 weights natively too (AVX512-BF16:
// x rounded to bf16, where Avx512Vnni widens the weights to fp32); Amx (Sapphire Rapids and later) multiplies
// bf16 matrices on AMX tiles (amx.inc), the rest as Avx512Vnni: every CPU with AMX so far takes four times an
// FMA's time for a vdpbf16ps (see native_bf16_pays).
enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Vnni = 3, Avx512Bf16 = 4, Amx = 5 };

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Amx: return "amx";
    case Isa::Avx512Bf16: return "avx512bf16";
    case Isa::Avx512Vnni: return "avx512vnni";
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

// The highest level below Amx that this CPU has.
inline Isa top_isa() {
  const CpuFeatures f = detect_cpu_features();
  // F16C (fp16 scales of quantized blocks) comes with AVX2 on every CPU, but is asked all the same.
  if (!__builtin_cpu_supports("f16c")) return Isa::Scalar;
  const bool vnni = f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni;
  if (vnni && f.avx512bf16) return Isa::Avx512Bf16;
  if (vnni) return Isa::Avx512Vnni;
  if (f.avx512f && f.avx512bw) return Isa::Avx512;
  if (f.avx2 && f.fma) return Isa::Avx2;
  return Isa::Scalar;
}

// Whether one vdpbf16ps (32 multiply-adds) takes less than 1.5x the time of one 16-lane FMA, timed on
// independent chains in registers (best of 3, ~1 ms in all): so on Zen 4 (about 1x), not on Sapphire Rapids,
// where it takes ~4x (widened weights and FMAs then multiply bf16 matrices at 1.1-1.3x the GFLOPS from 8
// vectors up; `bench_decode_step.py --matvec` prints both timings; benchmarks/RESULTS.md).
namespace bf16_probe {
constexpr int kChains = 12, kIters = 4096;

struct Fma {
  __attribute__((target("avx512f"))) __m512 operator()(__m512 acc, __m512 w) const { return _mm512_fmadd_ps(w, w, acc); }
};
struct DotBf16 {
  __attribute__((target("avx512f,avx512bf16"))) __m512 operator()(__m512 acc, __m512 w) const {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(w), reinterpret_cast<__m512bh>(w));
  }
};

// Nanoseconds per `step` on kChains independent chains, kIters steps each (w opaque: nothing folds), every
// chain's result used.
template <typename Step>
__attribute__((target("avx512f,avx512bf16"))) inline double ns_per_step(Step step) {
  __m512 acc[kChains], w = _mm512_set1_ps(1.0f);
  for (auto& a : acc) a = _mm512_setzero_ps();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kIters; ++i) {
    __asm__("" : "+v"(w));
    for (auto& a : acc) a = step(a, w);
  }
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count();
  for (int i = 1; i < kChains; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  volatile float sink = _mm512_reduce_add_ps(acc[0]);
  (void)sink;
  return ns / (kChains * kIters);
}
}  // namespace bf16_probe

struct Bf16Timing {
  double fma_ns, dot_ns;  // per 16-lane FMA, per vdpbf16ps
};

// Only on a CPU with AVX512-BF16 (top_isa() >= Avx512Bf16).
inline Bf16Timing time_bf16_products() {
  Bf16Timing t{1e30, 1e30};
  for (int round = 0; round < 3; ++round) {
    t.fma_ns = std::min(t.fma_ns, bf16_probe::ns_per_step(bf16_probe::Fma{}));
    t.dot_ns = std::min(t.dot_ns, bf16_probe::ns_per_step(bf16_probe::DotBf16{}));
  }
  return t;
}

inline bool native_bf16_pays() {
  const Bf16Timing t = time_bf16_products();
  return t.dot_ns < 1.5 * t.fma_ns;
}

// The level "auto" picks: Amx where the CPU has AMX-BF16 and the kernel grants this process the tiles, else the
// highest, except that bf16 weights are widened (Avx512Vnni) where native bf16 products do not pay (asked once
// per process).
inline Isa best_isa() {
  static const Isa best = [] {
    const Isa top = top_isa();
    if (top == Isa::Avx512Bf16 && detect_cpu_features().amx_bf16) return Isa::Amx;
    return top == Isa::Avx512Bf16 && !native_bf16_pays() ? Isa::Avx512Vnni : top;
  }();
  return best;
}

inline bool isa_supported(Isa isa) {
  if (isa == Isa::Amx) return top_isa() == Isa::Avx512Bf16 && detect_cpu_features().amx_bf16;
  return static_cast<int>(isa) <= static_cast<int>(top_isa());
}

// The ISA called `name`: "amx", "avx512bf16", "avx512vnni", "avx512", "avx2", "scalar", or "auto" (best_isa(); "" or
// "auto" read $LLAMA_FAST_CPU_ISA first). An unknown or unsupported name leaves a message in `error`.
inline Isa parse_isa(const std::string& name, std::string& error) {
  std::string want = name;
  if (want.empty() || want == "auto") {
    const char* env = std::getenv("LLAMA_FAST_CPU_ISA");
    want = env != nullptr && *env != '\0' ? env : "auto";
  }
  if (want == "auto") return best_isa();
  Isa isa = Isa::Scalar;
  for (Isa i : {Isa::Amx, Isa::Avx512Bf16, Isa::Avx512Vnni, Isa::Avx512, Isa::Avx2, Isa::Scalar})
    if (want == isa_name(i)) isa = i;
  if (want != isa_name(isa))
    error = "unknown isa '" + want + "' (auto, amx, avx512bf16, avx512vnni, avx512, avx2, scalar)";
  else if (!isa_supported(isa))
    error = "this CPU does not support isa '" + want + "'; it supports up to '" + isa_name(top_isa()) + "'";
  return error.empty() ? isa : best_isa();
}

struct Kernels {
  void (*dot_rows)(const void*, WType, int, int, int, const float*, int, int, float*, int);
  ActSpec (*act_spec)(WType);  // the activation pack of the quantized products (quant.h), and its quantizer
  void (*quantize_activations)(WType, const float*, int, uint8_t*);
  void (*silu_mul)(const float*, const float*, float*, int64_t);
  void (*attend_paged)(const float*, const float*, const void*, const void*, bool, const int32_t*, int, size_t, long, int,
                       int, int, int, const HeadSpan*, float*, float*);
};

#define LF_KERNELS(ns) \
  Kernels { ns::dot_rows, ns::act_spec, ns::quantize_activations, ns::silu_mul, ns::attend_paged }

inline Kernels kernels_for(Isa isa) {
  switch (isa) {
    case Isa::Amx: {
      Kernels k = LF_KERNELS(isa_avx512vnni);
      k.dot_rows = isa_amx::dot_rows;
      return k;
    }
    case Isa::Avx512Bf16: return LF_KERNELS(isa_avx512bf16);
    case Isa::Avx512Vnni: return LF_KERNELS(isa_avx512vnni);
    case Isa::Avx512: return LF_KERNELS(isa_avx512);
    case Isa::Avx2: return LF_KERNELS(isa_avx2);
    default: return LF_KERNELS(isa_scalar);
  }
}
#undef LF_KERNELS

// A matrix (out, in) row-major: fp32, bf16, or rows of GGUF blocks.
struct Matrix {
  const void* data = nullptr;
  WType type = WType::F32;
};

struct LayerWeights {
  Matrix wq, wk, wv, wo, w1, w2, w3;
  const float *attn_norm, *ffn_norm;            // (dim,) fp32
  const float *bq = nullptr, *bk = nullptr, *bv = nullptr;  // QKV biases (Qwen2), fp32, or null
};

struct ModelDesc {
  int dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, vocab;
  float eps;
  Matrix embedding;          // (vocab, dim)
  Matrix output;             // (vocab, dim); may be the embedding (tied)
  const float* final_norm;   // (dim,)
  const LayerWeights* layers;
  const float* rope;         // (rope_rows, rot_dim): [cos | sin] per position
  int rope_rows, rot_dim;
  const HeadSpan* span;      // (n_heads,)
};

inline size_t qkv_width(const ModelDesc& m) { return static_cast<size_t>(m.n_heads + 2 * m.n_kv_heads) * m.head_dim; }

// Where query position t meets the sinks under a window (docs/ARCHITECTURE.md section 3): its position in a
// cache holding only the sinks and the window, min(t, sinks + window - 1); t without a window.
inline int64_t sink_position(int64_t t, int window, int sinks) {
  return window > 0 ? std::min<int64_t>(t, sinks + window - 1) : t;
}

// Scores scratch of one attention call (attend_paged) for heads in groups of `group` over up to s_max keys.
inline size_t attention_scratch(int group, int s_max) {
  return static_cast<size_t>(group < kMaxGroupHeads ? group : kMaxGroupHeads) * s_max;
}

// A barrier for the threads of one parallel region that spins briefly, then yields the core: on a
// machine shared with other work, a thread waiting for a descheduled peer gives its core away instead of
// burning it (OpenMP's barrier spins far longer and made 2 threads slower than 1 on a loaded 2-core box).
struct SpinBarrier {
  std::atomic<int> arrived{0};
  std::atomic<int> generation{0};
  int n = 1;

  void wait() {
    if (n <= 1) return;
    const int gen = generation.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      arrived.store(0, std::memory_order_relaxed);
      generation.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins < 4000) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        sched_yield();
      }
    }
  }
};

// [lo, hi) of n items for thread t of nt, in multiples of `grain` (the last range takes the rest).
inline void split(int n, int grain, int t, int nt, int& lo, int& hi) {
  const int units = (n + grain - 1) / grain;
  const int per = units / nt, extra = units % nt;
  const int u0 = t * per + (t < extra ? t : extra), u1 = u0 + per + (t < extra ? 1 : 0);
  lo = u0 * grain < n ? u0 * grain : n;
  hi = u1 * grain < n ? u1 * grain : n;
}

// [lo, hi) of rows x per_row units (unit u in row u / per_row) for thread t of nt, split where the units' costs
// (cost[r] > 0 each for the units of row r) reach t / nt of their total, so threads get near-equal costs.
inline void split_by_cost(const int* cost, int rows, int per_row, int t, int nt, int& lo, int& hi) {
  int64_t total = 0;
  for (int r = 0; r < rows; ++r) total += static_cast<int64_t>(cost[r]) * per_row;
  auto start = [&](int i) {  // the first unit whose costs before it reach i / nt of the total
    const int64_t target = total * i / nt;
    int64_t before = 0;
    for (int r = 0; r < rows; ++r) {
      const int64_t row = static_cast<int64_t>(cost[r]) * per_row;
      if (before + row > target) return r * per_row + static_cast<int>((target - before + cost[r] - 1) / cost[r]);
      before += row;
    }
    return rows * per_row;
  };
  lo = t == 0 ? 0 : start(t);
  hi = t == nt - 1 ? rows * per_row : start(t + 1);
}

// The sum of squares in one order for every caller, written so that the compiler vectorizes it at any width:
// element i goes into partial sum i % 16, then the 16 are added in a fixed tree (8 pairs, 4, 2, 1).
inline void rms_norm(const float* x, const float* w, int n, float eps, float* out) {
  constexpr int kParts = 16;
  float part[kParts] = {};
  int i = 0;
  for (; i + kParts <= n; i += kParts)
    for (int p = 0; p < kParts; ++p) part[p] += x[i + p] * x[i + p];
  for (int p = 0; i < n; ++i, ++p) part[p] += x[i] * x[i];
  for (int width = kParts / 2; width > 0; width /= 2)
    for (int p = 0; p < width; ++p) part[p] += part[p + width];
  const float ss = part[0];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// x[i] += y[i]: the residual adds, in a loop the compiler vectorizes (x and y never overlap).
inline void add_into(float* __restrict x, const float* __restrict y, int n) {
  for (int i = 0; i < n; ++i) x[i] += y[i];
}

inline void rope(float* x, const float* cs, int rot_dim) {
  const int half = rot_dim / 2;
  for (int i = 0; i < half; ++i) {
    const float c = cs[i], s = cs[half + i], x1 = x[i], x2 = x[half + i];
    x[i] = x1 * c - x2 * s;
    x[half + i] = x2 * c + x1 * s;
  }
}

// Row `row` of a (rows, n) matrix in fp32 (the embedding lookup).
inline void load_row(const Matrix& table, int64_t row, int n, float* out) {
  dequantize_row(table.type, static_cast<const char*>(table.data) + row * row_bytes(table.type, n), n, out);
}

inline void store_row(void* dst, bool bf16, const float* src, int n) {
  if (bf16) {
    uint16_t* p = static_cast<uint16_t*>(dst);
    for (int i = 0; i < n; ++i) p[i] = f32_to_bf16(src[i]);
  } else {
    std::memcpy(dst, src, sizeof(float) * n);
  }
}

}  // namespace cpu_decode
}  // namespace llama_fast
