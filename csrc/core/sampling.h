// Token sampling on raw pointers (docs/ARCHITECTURE.md section 3b): one row of logits -> one token id.
// Torch-free: the host code (sampling_cpu.cpp) validates arguments and calls sample_row per row.
//
// Order: penalties on the raw logits -> temperature (0: greedy argmax, ties to the lowest id) -> top_k ->
// top_p -> min_p -> renormalise -> one uniform draw from Philox(seed, step).
// No full sort of the vocabulary: a one-pass radix histogram of the (order-preserving) float keys finds the
// few buckets that can hold the top-k / nucleus, and only those candidates are sorted.
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "philox.h"
#include "quant.h"  // fp16_to_f32, bf16_to_f32

namespace llama_fast {

// Per-row parameters, already validated by the host code.
struct SampleParams {
  float temperature = 1.f;   // 0: greedy
  int64_t top_k = 0;         // 0 or >= V: off
  float top_p = 1.f;         // 1: off
  float min_p = 0.f;         // 0: off
  float repetition_penalty = 1.f;
  float presence_penalty = 0.f;
  float frequency_penalty = 0.f;
  uint64_t seed = 0;
  uint64_t step = 0;
  LLAMA_FAST_HD bool has_penalties() const {
    return repetition_penalty != 1.f || presence_penalty != 0.f || frequency_penalty != 0.f;
  }
};

enum class SampleStatus : int { kOk = 0, kNonFinite = 1 };

// Per-thread scratch, reused across rows.
struct SampleWorkspace {
  std::vector<float> x;        // (V,) logits after penalties / temperature
  std::vector<float> e;        // (V,) exp(x - max)
  std::vector<int32_t> cand;   // candidate ids
  void resize(int64_t V) {
    if (static_cast<int64_t>(x.size()) < V) {
      x.resize(V);
      e.resize(V);
      cand.resize(V);
    }
  }
};

// A row of logits as fp32 (rows may be fp32, fp16 or bf16).
enum class LogitType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

inline void load_row(const void* src, LogitType type, int64_t V, float* dst) {
  if (type == LogitType::kF32) {
    std::memcpy(dst, src, sizeof(float) * V);
  } else if (type == LogitType::kF16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < V; ++i) dst[i] = cpu_decode::fp16_to_f32(s[i]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < V; ++i) dst[i] = cpu_decode::bf16_to_f32(s[i]);
  }
}

// exp(x) for x <= 0, vectorisable (no libm call): Cody-Waite range reduction and a degree-6 polynomial,
// relative error ~2e-7. Inputs below -87 give 0.
inline float exp_nonpositive(float x_in) {
  const float x = x_in < -87.0f ? -87.0f : x_in;
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (SSE2-friendly)
  float f = x - n * 0.693145751953125f;  // ln 2, split in two for accuracy
  f = f - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x_in < -87.0f ? 0.0f : p * scale;
}

// e[i] = exp(x[i] - m) for all i; returns the sum (fp64 of 16 fp32 lanes, so the loop vectorises).
inline double exp_and_sum(const float* x, float m, int64_t V, float* e) {
  constexpr int L = 16;
  float acc[L] = {0};
  int64_t i = 0;
  for (; i + L <= V; i += L) {
    for (int j = 0; j < L; ++j) {
      const float v = exp_nonpositive(x[i + j] - m);
      e[i + j] = v;
      acc[j] += v;
    }
  }
  double total = 0;
  for (; i < V; ++i) {
    e[i] = exp_nonpositive(x[i] - m);
    total += e[i];
  }
  for (int j = 0; j < L; ++j) total += acc[j];
  return total;
}

// Index of the first maximum (ties to the lowest id) and whether every value is finite.
inline int64_t argmax_first(const float* x, int64_t V) {
  float best = x[0];
  int64_t arg = 0;
  for (int64_t i = 1; i < V; ++i) {
    if (x[i] > best) { best = x[i]; arg = i; }
  }
  return arg;
}

inline bool all_finite(const float* x, int64_t V) {
  // x - x is 0 for finite x, NaN for inf and NaN; a sum of NaN stays NaN. Vectorisable.
  constexpr int L = 16;
  float acc[L] = {0};
  int64_t i = 0;
  for (; i + L <= V; i += L)
    for (int j = 0; j < L; ++j) acc[j] += x[i + j] - x[i + j];
  float tail = 0;
  for (; i < V; ++i) tail += x[i] - x[i];
  for (int j = 0; j < L; ++j) tail += acc[j];
  return tail == 0.0f;
}

// Repetition / presence / frequency penalties, exactly as reference.apply_penalties computes them in fp32.
// A value past fp32's range counts as its largest (or smallest): a huge penalty makes its token the likeliest
// (or the least likely), never +-inf, whose softmax is NaN.
LLAMA_FAST_HD float clamp_finite(float x) { return x > FLT_MAX ? FLT_MAX : x < -FLT_MAX ? -FLT_MAX : x; }

// Logit v of a token seen `count` (> 0) times, penalised: repetition divides a positive logit and multiplies a
// negative one, frequency (per time seen) and presence subtract. On the GPU in IEEE operations that fast
// math cannot fuse, as the CPU computes them.
LLAMA_FAST_HD float penalised_logit(float v, float count, const SampleParams& p) {
#ifdef __CUDA_ARCH__
  if (p.repetition_penalty != 1.f) v = v > 0 ? __fdiv_rn(v, p.repetition_penalty) : __fmul_rn(v, p.repetition_penalty);
  const float sub = __fadd_rn(__fmul_rn(p.frequency_penalty, count), p.presence_penalty);
  return clamp_finite(__fsub_rn(clamp_finite(v), clamp_finite(sub)));
#else
  if (p.repetition_penalty != 1.f) v = v > 0 ? v / p.repetition_penalty : v * p.repetition_penalty;
  const float sub = p.frequency_penalty * count + p.presence_penalty;
  return clamp_finite(clamp_finite(v) - clamp_finite(sub));
#endif
}

template <typename Count>
inline void apply_penalties_row(float* x, const Count* seen, int64_t V, const SampleParams& p) {
  for (int64_t i = 0; i < V; ++i) {
    if (seen[i] > 0) x[i] = penalised_logit(x[i], static_cast<float>(seen[i]), p);
  }
}

// Order-preserving map of a finite float to uint32 (larger float -> larger key).
inline uint32_t float_key(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

constexpr int kRadixBits = 12;
constexpr int kRadixBuckets = 1 << kRadixBits;

// Samples one row whose logits are already in ws.x (penalised, finite). Returns the token id.
inline int64_t sample_filtered_row(SampleWorkspace& ws, int64_t V, const SampleParams& p) {
  float* x = ws.x.data();
  if (p.temperature == 0.f || p.top_k == 1) return argmax_first(x, V);
  // Scaled logits relative to the maximum, (x - max) / temperature: <= 0, and no overflow for huge
  // logits or tiny temperatures (the order, and so top_k / top_p / min_p, is that of x / temperature).
  const int64_t top = argmax_first(x, V);
  {
    const float raw_max = x[top], t = p.temperature;
    for (int64_t i = 0; i < V; ++i) x[i] = (x[i] - raw_max) / t;
  }
  const float m = 0.0f;
  float* e = ws.e.data();
  const double Z = exp_and_sum(x, m, V, e);  // e[top] == 1
  const bool use_k = p.top_k > 0 && p.top_k < V;
  const bool use_p = p.top_p < 1.f;
  const double u = philox_uniform(p.seed, p.step);
  const float min_e = p.min_p;  // min_p * max prob, relative to e_max == 1

  if (!use_k && !use_p) {
    // Only min_p (or nothing): no ordering needed, draw in id order.
    double mass = 0;
    if (min_e > 0.f) {
      for (int64_t i = 0; i < V; ++i) mass += e[i] >= min_e ? e[i] : 0.f;
    } else {
      mass = Z;
    }
    const double target = u * mass;
    double cum = 0;
    int64_t last = top;
    for (int64_t i = 0; i < V; ++i) {
      if (min_e > 0.f && e[i] < min_e) continue;
      cum += e[i];
      last = i;
      if (cum > target) return i;
    }
    return last;
  }

  // Radix histogram (top 12 bits of the order-preserving key): counts and masses per bucket.
  uint32_t counts[kRadixBuckets];
  double masses[kRadixBuckets];
  std::memset(counts, 0, sizeof(counts));
  std::memset(masses, 0, sizeof(masses));
  for (int64_t i = 0; i < V; ++i) {
    const uint32_t b = float_key(x[i]) >> (32 - kRadixBits);
    counts[b] += 1;
    masses[b] += e[i];
  }
  auto before = [x](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
  int32_t* cand = ws.cand.data();
  if (!use_k) {
    // top_p alone: the bucket where the mass from the top crosses top_p * Z holds the nucleus' edge. Only
    // that bucket's tokens are sorted; the nucleus is every token ranking at or before the last kept one
    // (x desc, id asc), drawn in id order.
    const double goal = static_cast<double>(p.top_p) * Z;
    double above = 0;
    int b_edge = -1;
    for (int b = kRadixBuckets - 1; b >= 0; --b) {
      if (above + masses[b] >= goal && counts[b] > 0) { b_edge = b; break; }
      above += masses[b];
    }
    float xp = -std::numeric_limits<float>::infinity();
    int64_t idp = V - 1;  // rounding never reached the goal: keep everything
    if (b_edge >= 0) {
      int64_t n = 0;
      for (int64_t i = 0; i < V; ++i)
        if (static_cast<int>(float_key(x[i]) >> (32 - kRadixBits)) == b_edge) cand[n++] = static_cast<int32_t>(i);
      std::sort(cand, cand + n, before);
      double mass_before = above;
      int64_t j = 0;
      while (j + 1 < n && mass_before + e[cand[j]] < goal) mass_before += e[cand[j++]];
      xp = x[cand[j]];
      idp = cand[j];
    }
    auto kept = [&](int64_t i) {
      return (x[i] > xp || (x[i] == xp && i <= idp)) && (min_e <= 0.f || e[i] >= min_e);
    };
    double mass = 0;
    for (int64_t i = 0; i < V; ++i) mass += kept(i) ? e[i] : 0.f;
    const double target = u * mass;
    double cum = 0;
    int64_t last = top;
    for (int64_t i = 0; i < V; ++i) {
      if (!kept(i)) continue;
      cum += e[i];
      last = i;
      if (cum > target) return i;
    }
    return last;
  }
  // Walk from the top bucket until the candidate buckets surely hold the top-k (count) or the nucleus
  // (mass; with a small margin against rounding). With top_k, the nucleus lies inside the top-k.
  const int64_t k = use_k ? p.top_k : V;
  const double mass_goal = use_p ? static_cast<double>(p.top_p) * Z * (1.0 + 1e-6) : 0.0;
  int b_low = 0;
  {
    int64_t cnt = 0;
    double mass = 0;
    for (int b = kRadixBuckets - 1; b >= 0; --b) {
      cnt += counts[b];
      mass += masses[b];
      const bool enough = use_k ? cnt >= k : mass >= mass_goal;
      if (enough) { b_low = b; break; }
    }
  }
  int64_t n = 0;
  for (int64_t i = 0; i < V; ++i) {
    if (static_cast<int>(float_key(x[i]) >> (32 - kRadixBits)) >= b_low) cand[n++] = static_cast<int32_t>(i);
  }
  // Most likely first, ties to the lower id (the reference's stable descending argsort).
  if (use_k && n > k) {
    std::partial_sort(cand, cand + k, cand + n, before);
    n = k;
  } else {
    std::sort(cand, cand + n, before);
  }
  // Kept prefix: top_p relative to the mass of the top-k survivors (or of everything without top_k).
  double kept_total = 0;
  if (use_k) {
    for (int64_t j = 0; j < n; ++j) kept_total += e[cand[j]];
  } else {
    kept_total = Z;
  }
  int64_t keep = n;
  if (use_p) {
    const double goal = static_cast<double>(p.top_p) * kept_total;
    double before_mass = 0;
    keep = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (!(before_mass < goal) && j > 0) break;
      before_mass += e[cand[j]];
      keep = j + 1;
    }
  }
  if (min_e > 0.f) {
    int64_t j = 1;
    while (j < keep && e[cand[j]] >= min_e) ++j;
    keep = j;
  }
  double mass = 0;
  for (int64_t j = 0; j < keep; ++j) mass += e[cand[j]];
  const double target = u * mass;
  double cum = 0;
  for (int64_t j = 0; j < keep; ++j) {
    cum += e[cand[j]];
    if (cum > target) return cand[j];
  }
  return cand[keep - 1];
}

// log_softmax(raw logits)[token], in fp64 over an fp32 row.
inline float raw_logprob(const float* raw, int64_t V, int64_t token) {
  float m = raw[0];
  for (int64_t i = 1; i < V; ++i) m = raw[i] > m ? raw[i] : m;
  double s = 0;
  for (int64_t i = 0; i < V; ++i) s += std::exp(static_cast<double>(raw[i]) - m);
  return static_cast<float>(static_cast<double>(raw[token]) - m - std::log(s));
}

}  // namespace llama_fast
