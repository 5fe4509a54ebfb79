// The whole decode step of a LLaMA-family model on CPU, for one new token per sequence: embedding ->
// n_layers x (RMSNorm, QKV, RoPE, KV-cache append, span-biased GQA attention, output projection + residual,
// RMSNorm, SwiGLU MLP + residual) -> RMSNorm -> logits. Torch-free; decode_cpu.cpp checks the tensors and
// calls decode_step.
//
// Decode is memory-bound (every weight is read once per token), so the matrix-vector products stream the
// weights (fp32, or bf16 widened to fp32 in registers) with the widest vectors the CPU has, chosen at run
// time (the build has no -march flags): AVX-512, AVX2+FMA, or plain C++. All activations are fp32.
// One OpenMP parallel region per step: threads split each product by output rows (and attention by
// heads) and meet at a barrier only where the next op needs every row (5 per layer; SpinBarrier).
#pragma once

#include <immintrin.h>
#include <omp.h>

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_features.h"

namespace llama_fast {
namespace cpu_decode {

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

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

#define LF_NS isa_avx512
#define LF_W 16
#define LF_FN __attribute__((target("avx512f,avx512bw")))
#include "cpu_decode_isa.inc"
#undef LF_NS
#undef LF_W
#undef LF_FN

#define LF_NS isa_avx2
#define LF_W 8
#define LF_FN __attribute__((target("avx2,fma")))
#include "cpu_decode_isa.inc"
#undef LF_NS
#undef LF_W
#undef LF_FN

#define LF_NS isa_scalar
#define LF_W 1
#define LF_FN
#include "cpu_decode_isa.inc"
#undef LF_NS
#undef LF_W
#undef LF_FN

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

inline const char* isa_name(Isa isa) {
  return isa == Isa::Avx512 ? "avx512" : isa == Isa::Avx2 ? "avx2" : "scalar";
}

inline Isa best_isa() {
  const CpuFeatures f = detect_cpu_features();
  if (f.avx512f && f.avx512bw) return Isa::Avx512;
  if (f.avx2 && f.fma) return Isa::Avx2;
  return Isa::Scalar;
}

inline bool isa_supported(Isa isa) { return static_cast<int>(isa) <= static_cast<int>(best_isa()); }

// The ISA called `name`: "avx512", "avx2", "scalar", or "auto" (the best this CPU has; "" or "auto" read
// $LLAMA_FAST_CPU_ISA first). An unknown or unsupported name leaves a message in `error`.
inline Isa parse_isa(const std::string& name, std::string& error) {
  std::string want = name;
  if (want.empty() || want == "auto") {
    const char* env = std::getenv("LLAMA_FAST_CPU_ISA");
    want = env != nullptr && *env != '\0' ? env : "auto";
  }
  if (want == "auto") return best_isa();
  const Isa isa = want == "avx512" ? Isa::Avx512 : want == "avx2" ? Isa::Avx2 : Isa::Scalar;
  if (want != "avx512" && want != "avx2" && want != "scalar")
    error = "unknown isa '" + want + "' (auto, avx512, avx2, scalar)";
  else if (!isa_supported(isa))
    error = "this CPU does not support isa '" + want + "'; it supports up to '" + isa_name(best_isa()) + "'";
  return error.empty() ? isa : best_isa();
}

struct Kernels {
  void (*dot_rows)(const void*, bool, int, int, int, const float*, int, int, float*, int);
  void (*attend)(const float*, const void*, const void*, bool, long, int, int, int, const HeadSpan*, float*, float*);
  void (*silu_mul)(const float*, const float*, float*, int64_t);
};

inline Kernels kernels_for(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return {isa_avx512::dot_rows, isa_avx512::attend, isa_avx512::silu_mul};
    case Isa::Avx2: return {isa_avx2::dot_rows, isa_avx2::attend, isa_avx2::silu_mul};
    default: return {isa_scalar::dot_rows, isa_scalar::attend, isa_scalar::silu_mul};
  }
}

struct LayerWeights {
  const void *wq, *wk, *wv, *wo, *w1, *w2, *w3;  // (out, in) row-major, fp32 or bf16 (ModelDesc::w_bf16)
  const float *attn_norm, *ffn_norm;            // (dim,) fp32
};

struct ModelDesc {
  int dim, n_layers, n_heads, n_kv_heads, head_dim, ffn_dim, vocab;
  float eps;
  bool w_bf16;
  const void* embedding;     // (vocab, dim)
  const void* output;        // (vocab, dim); may be the embedding (tied)
  const float* final_norm;   // (dim,)
  const LayerWeights* layers;
  const float* rope;         // (rope_rows, rot_dim): [cos | sin] per position
  int rope_rows, rot_dim;
  const HeadSpan* span;      // (n_heads,)
};

// One row per new token. Rows are usually one token of each sequence in a batch (row b in cache row b), but
// several rows may be consecutive tokens of one sequence (a prompt's chunk, via cache_rows): every row's
// K/V is stored before any row attends, so each sees the tokens before it.
struct StepDesc {
  int batch;
  const int64_t* tokens;     // (batch,)
  const int32_t* positions;  // (batch,): cache position of each row's new token
  const int32_t* cache_rows = nullptr;  // (batch,): the cache row each row reads and writes; null: row b -> b
  int s_max;                 // cache capacity per row
  bool kv_bf16;
  void* const* k_cache;      // n_layers pointers to (cache rows, s_max, n_kv_heads, head_dim)
  void* const* v_cache;
  int logits_from = 0;       // logits only of rows [logits_from, batch) (a prompt chunk needs its last only)
  float* logits;             // (batch - logits_from, vocab)
  int num_threads;
  float* workspace;          // workspace_floats(...) floats
};

inline size_t qkv_width(const ModelDesc& m) { return static_cast<size_t>(m.n_heads + 2 * m.n_kv_heads) * m.head_dim; }

// Scores scratch of one attention call (attend) for heads in groups of `group` over up to s_max keys.
inline size_t attention_scratch(int group, int s_max) {
  return static_cast<size_t>(group < kMaxGroupHeads ? group : kMaxGroupHeads) * s_max;
}

inline size_t workspace_floats(const ModelDesc& m, int batch, int s_max, int num_threads) {
  const size_t B = batch;
  const size_t shared = B * m.dim /*x*/ + B * qkv_width(m) + B * m.n_heads * m.head_dim /*att*/ +
                        2 * B * m.ffn_dim /*gate, up*/ + B * m.dim /*tmp*/;
  const size_t per_thread = B * m.dim /*normed x*/ + attention_scratch(m.n_heads / m.n_kv_heads, s_max) + 16;
  return shared + per_thread * num_threads;
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

inline void rms_norm(const float* x, const float* w, int n, float eps, float* out) {
  float ss = 0.0f;
  for (int i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

inline void rope(float* x, const float* cs, int rot_dim) {
  const int half = rot_dim / 2;
  for (int i = 0; i < half; ++i) {
    const float c = cs[i], s = cs[half + i], x1 = x[i], x2 = x[half + i];
    x[i] = x1 * c - x2 * s;
    x[half + i] = x2 * c + x1 * s;
  }
}

inline void load_row(const void* table, bool bf16, int64_t row, int n, float* out) {
  if (bf16) {
    const uint16_t* p = static_cast<const uint16_t*>(table) + row * n;
    for (int i = 0; i < n; ++i) out[i] = bf16_to_f32(p[i]);
  } else {
    std::memcpy(out, static_cast<const float*>(table) + row * n, sizeof(float) * n);
  }
}

inline void store_row(void* dst, bool bf16, const float* src, int n) {
  if (bf16) {
    uint16_t* p = static_cast<uint16_t*>(dst);
    for (int i = 0; i < n; ++i) p[i] = f32_to_bf16(src[i]);
  } else {
    std::memcpy(dst, src, sizeof(float) * n);
  }
}

// One decode step. Inputs are assumed valid (decode_cpu.cpp checks them).
inline void decode_step(const ModelDesc& m, const StepDesc& s, Isa isa) {
  const Kernels kern = kernels_for(isa);
  const int B = s.batch, dim = m.dim, D = m.head_dim, H = m.n_heads, Hkv = m.n_kv_heads, F = m.ffn_dim;
  const int nq = H * D, nkv = Hkv * D, nqkv = nq + 2 * nkv, group = H / Hkv;
  float* ws = s.workspace;
  float* x = ws; ws += static_cast<size_t>(B) * dim;            // (B, dim) the residual stream
  float* qkv = ws; ws += static_cast<size_t>(B) * nqkv;         // (B, nq + 2 nkv)
  float* att = ws; ws += static_cast<size_t>(B) * nq;           // (B, H * D)
  float* gate = ws; ws += static_cast<size_t>(B) * F;           // (B, F), then silu(gate) * up
  float* up = ws; ws += static_cast<size_t>(B) * F;
  float* tmp = ws; ws += static_cast<size_t>(B) * dim;
  float* per_thread = ws;
  const size_t per_thread_floats = static_cast<size_t>(B) * dim + attention_scratch(group, s.s_max) + 16;
  const size_t kv_row = static_cast<size_t>(s.s_max) * nkv;  // elements per batch row of a cache tensor
  const size_t esz = s.kv_bf16 ? 2 : 4;
  auto cache_row = [&](int b) { return static_cast<size_t>(s.cache_rows != nullptr ? s.cache_rows[b] : b); };

  for (int b = 0; b < B; ++b) load_row(m.embedding, m.w_bf16, s.tokens[b], dim, x + static_cast<size_t>(b) * dim);

  SpinBarrier barrier;
#pragma omp parallel num_threads(s.num_threads)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#pragma omp single
    barrier.n = nt;  // (the implicit barrier of `single` publishes it)
    float* xn = per_thread + t * per_thread_floats;  // (B, dim) this thread's copy of the normed x
    float* scores = xn + static_cast<size_t>(B) * dim;
    int lo, hi;
    for (int l = 0; l < m.n_layers; ++l) {
      const LayerWeights& w = m.layers[l];
      for (int b = 0; b < B; ++b) rms_norm(x + b * dim, w.attn_norm, dim, m.eps, xn + b * dim);
      // QKV: rows split in whole heads, so each thread applies RoPE and fills the cache for its own heads.
      split(nqkv, D, t, nt, lo, hi);
      {
        const void* mats[3] = {w.wq, w.wk, w.wv};
        const int starts[4] = {0, nq, nq + nkv, nqkv};
        for (int i = 0; i < 3; ++i) {
          const int a = lo > starts[i] ? lo : starts[i], e = hi < starts[i + 1] ? hi : starts[i + 1];
          if (a < e) kern.dot_rows(mats[i], m.w_bf16, dim, a - starts[i], e - starts[i], xn, dim, B, qkv + starts[i], nqkv);
        }
      }
      for (int head = lo / D; head < hi / D; ++head) {
        for (int b = 0; b < B; ++b) {
          float* v = qkv + static_cast<size_t>(b) * nqkv + head * D;
          const int pos = s.positions[b];
          if (head < H + Hkv) rope(v, m.rope + static_cast<size_t>(pos) * m.rot_dim, m.rot_dim);
          if (head >= H) {
            const bool is_k = head < H + Hkv;
            const int kh = is_k ? head - H : head - H - Hkv;
            char* base = static_cast<char*>(is_k ? s.k_cache[l] : s.v_cache[l]);
            store_row(base + (cache_row(b) * kv_row + static_cast<size_t>(pos) * nkv + kh * D) * esz, s.kv_bf16, v, D);
          }
        }
      }
      barrier.wait();
      // Heads split evenly over the threads; a thread's heads of one KV group go in one call (one read of
      // the group's cache).
      split(B * H, 1, t, nt, lo, hi);
      for (int u = lo, nh; u < hi; u += nh) {
        const int b = u / H, h = u % H, kh = h / group;
        nh = std::min({hi - u, (kh + 1) * group - h, kMaxGroupHeads});
        const char* kb = static_cast<const char*>(s.k_cache[l]) + (cache_row(b) * kv_row + kh * D) * esz;
        const char* vb = static_cast<const char*>(s.v_cache[l]) + (cache_row(b) * kv_row + kh * D) * esz;
        kern.attend(qkv + static_cast<size_t>(b) * nqkv + h * D, kb, vb, s.kv_bf16, nkv, D, s.positions[b], nh,
                    m.span + h, scores, att + static_cast<size_t>(b) * nq + h * D);
      }
      barrier.wait();
      split(dim, 16, t, nt, lo, hi);
      kern.dot_rows(w.wo, m.w_bf16, nq, lo, hi, att, nq, B, tmp, dim);
      for (int b = 0; b < B; ++b)
        for (int r = lo; r < hi; ++r) x[b * dim + r] += tmp[b * dim + r];
      barrier.wait();
      for (int b = 0; b < B; ++b) rms_norm(x + b * dim, w.ffn_norm, dim, m.eps, xn + b * dim);
      split(F, 16, t, nt, lo, hi);
      kern.dot_rows(w.w1, m.w_bf16, dim, lo, hi, xn, dim, B, gate, F);
      kern.dot_rows(w.w3, m.w_bf16, dim, lo, hi, xn, dim, B, up, F);
      for (int b = 0; b < B; ++b) kern.silu_mul(gate + b * F + lo, up + b * F + lo, gate + b * F + lo, hi - lo);
      barrier.wait();
      split(dim, 16, t, nt, lo, hi);
      kern.dot_rows(w.w2, m.w_bf16, F, lo, hi, gate, F, B, tmp, dim);
      for (int b = 0; b < B; ++b)
        for (int r = lo; r < hi; ++r) x[b * dim + r] += tmp[b * dim + r];
      barrier.wait();
    }
    for (int b = s.logits_from; b < B; ++b) rms_norm(x + b * dim, m.final_norm, dim, m.eps, xn + b * dim);
    split(m.vocab, 16, t, nt, lo, hi);
    kern.dot_rows(m.output, m.w_bf16, dim, lo, hi, xn + static_cast<size_t>(s.logits_from) * dim, dim,
                  B - s.logits_from, s.logits, m.vocab);
  }
}

}  // namespace cpu_decode
}  // namespace llama_fast
