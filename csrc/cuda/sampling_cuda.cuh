// CUDA sampler kernel (torch-free): one thread block per row, no sort. Filters are thresholds found by
// bisection on the bits of the (positive) probabilities, a radix-select: top_k's pivot is the largest
// value with at least k tokens at or above it, top_p's pivot the smallest value whose strictly-larger
// mass is below top_p of the kept mass; ties at a pivot are kept in id order (the reference's stable
// sort), found with a block-wide prefix count. The draw is a block-wide prefix sum over id-ordered chunks.
// Same order and semantics as sampling.h (docs/ARCHITECTURE.md section 3b).
#pragma once

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <climits>
#include <cstdint>

#include "../core/philox.h"
#include "../core/sampling.h"  // SampleParams (plain data)

namespace llama_fast {
namespace cuda {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a > b ? a : b; }
};

struct ArgMax {
  float value;
  int index;
};
struct ArgMaxOp {
  __device__ __forceinline__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    if (a.value > b.value || (a.value == b.value && a.index < b.index)) return a;
    return b;
  }
};

template <int BLOCK>
struct SampleSmem {
  union {
    typename cub::BlockReduce<float, BLOCK>::TempStorage reduce_f;
    typename cub::BlockReduce<double, BLOCK>::TempStorage reduce_d;
    typename cub::BlockReduce<int, BLOCK>::TempStorage reduce_i;
    typename cub::BlockReduce<ArgMax, BLOCK>::TempStorage reduce_arg;
    typename cub::BlockScan<float, BLOCK>::TempStorage scan_f;
    typename cub::BlockScan<int, BLOCK>::TempStorage scan_i;
  } tmp;
  float f;
  double d;
  int i;
  ArgMax arg;
  int chosen;
};

// Thread 0's value of a block-wide reduction, given to every thread through the shared `slot`.
template <typename T>
__device__ T from_thread0(T v, T& slot) {
  if (threadIdx.x == 0) slot = v;
  __syncthreads();
  const T out = slot;
  __syncthreads();
  return out;
}

// Block-wide sum / count / max, broadcast to every thread.
template <int BLOCK>
__device__ double block_sum(double v, SampleSmem<BLOCK>& s) {
  return from_thread0(cub::BlockReduce<double, BLOCK>(s.tmp.reduce_d).Sum(v), s.d);
}
template <int BLOCK>
__device__ int block_count(int v, SampleSmem<BLOCK>& s) {
  return from_thread0(cub::BlockReduce<int, BLOCK>(s.tmp.reduce_i).Sum(v), s.i);
}
template <int BLOCK>
__device__ float block_max(float v, SampleSmem<BLOCK>& s) {
  return from_thread0(cub::BlockReduce<float, BLOCK>(s.tmp.reduce_f).Reduce(v, MaxOp()), s.f);
}
template <int BLOCK>
__device__ int block_exclusive_count(int v, SampleSmem<BLOCK>& s) {
  int prefix;
  cub::BlockScan<int, BLOCK>(s.tmp.scan_i).ExclusiveSum(v, prefix);
  __syncthreads();
  return prefix;
}

// Keeps, of the tokens with w == pivot, those whose rank among them (in id order) passes keep(rank);
// zeroes the rest, and zeroes every token below the pivot. Chunked so ranks follow ids.
template <int BLOCK, typename Keep>
__device__ void keep_ties_in_id_order(float* w, int64_t V, float pivot, Keep keep, SampleSmem<BLOCK>& s) {
  const int64_t chunk = (V + BLOCK - 1) / BLOCK;
  const int64_t lo = imin(V, threadIdx.x * chunk), hi = imin(V, lo + chunk);
  int ties = 0;
  for (int64_t i = lo; i < hi; ++i) ties += w[i] == pivot;
  int rank = block_exclusive_count<BLOCK>(ties, s);
  for (int64_t i = lo; i < hi; ++i) {
    const float v = w[i];
    if (v < pivot) {
      w[i] = 0.f;
    } else if (v == pivot) {
      if (!keep(rank)) w[i] = 0.f;
      ++rank;
    }
  }
  __syncthreads();
}

template <int BLOCK, typename T, typename Count>
__global__ void __launch_bounds__(BLOCK) sample_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t V,
                                                       const Count* __restrict__ seen, int64_t seen_stride,
                                                       const SampleParams* __restrict__ params,
                                                       float* __restrict__ work, int64_t* __restrict__ tokens,
                                                       float* __restrict__ logprobs, int* __restrict__ bad) {
  __shared__ SampleSmem<BLOCK> s;
  const int64_t b = blockIdx.x;
  const SampleParams p = params[b];
  const T* row = logits + b * row_stride;
  float* w = work + b * V;
  const int tid = threadIdx.x;

  // Pass 1: load, finiteness, penalties, argmax of the penalised logits (ties to the lowest id).
  int nonfinite = 0;
  float raw_max = -FLT_MAX;
  ArgMax best{-FLT_MAX, INT_MAX};
  const bool penalise = seen != nullptr && p.has_penalties();
  for (int64_t i = tid; i < V; i += BLOCK) {
    float x = to_float<T>(row[i]);
    if (!isfinite(x)) {
      nonfinite = 1;
      x = 0.f;
    }
    raw_max = fmaxf(raw_max, x);
    if (penalise) {
      const Count c = seen[b * seen_stride + i];
      if (c > 0) x = penalised_logit(x, static_cast<float>(c), p);
    }
    w[i] = x;
    if (x > best.value || (x == best.value && i < best.index)) best = ArgMax{x, static_cast<int>(i)};
  }
  if (block_count<BLOCK>(nonfinite, s) > 0) {
    if (tid == 0) {
      bad[b] = 1;
      tokens[b] = -1;
      if (logprobs) logprobs[b] = NAN;
    }
    return;
  }
  best = from_thread0(cub::BlockReduce<ArgMax, BLOCK>(s.tmp.reduce_arg).Reduce(best, ArgMaxOp()), s.arg);
  raw_max = block_max<BLOCK>(raw_max, s);
  int64_t token = best.index;

  if (!(p.temperature == 0.f || p.top_k == 1)) {
    // Pass 2: w = exp((x - max) / temperature) in (0, 1], the argmax at exactly 1.
    const float m = best.value, t = p.temperature;
    double z = 0;
    for (int64_t i = tid; i < V; i += BLOCK) {
      const float e = expf((w[i] - m) / t);
      w[i] = e;
      z += e;
    }
    double kept_mass = block_sum<BLOCK>(z, s);

    // top_k: pivot = the largest value with at least k tokens >= it (bisection on the float bits).
    if (p.top_k > 0 && p.top_k < V) {
      const int k = static_cast<int>(p.top_k);
      uint32_t lo = 0, hi = 0x3F800001u;  // count(w >= lo) >= k > count(w >= hi)
      while (hi - lo > 1) {
        const uint32_t mid = lo + (hi - lo) / 2;
        const float pivot = __uint_as_float(mid);
        int c = 0;
        for (int64_t i = tid; i < V; i += BLOCK) c += w[i] >= pivot;
        if (block_count<BLOCK>(c, s) >= k) lo = mid; else hi = mid;
      }
      const float pivot = __uint_as_float(lo);
      int above = 0;
      for (int64_t i = tid; i < V; i += BLOCK) above += w[i] > pivot;
      const int room = k - block_count<BLOCK>(above, s);
      keep_ties_in_id_order<BLOCK>(w, V, pivot, [room](int rank) { return rank < room; }, s);
      double m2 = 0;
      for (int64_t i = tid; i < V; i += BLOCK) m2 += w[i];
      kept_mass = block_sum<BLOCK>(m2, s);
    }
    // top_p: pivot = the smallest value whose strictly larger kept mass is below top_p * kept mass.
    if (p.top_p < 1.f) {
      const double goal = static_cast<double>(p.top_p) * kept_mass;
      uint32_t lo = 0, hi = 0x3F800000u;  // S(lo) >= goal > S(hi), S(t) = mass of w > t
      while (hi - lo > 1) {
        const uint32_t mid = lo + (hi - lo) / 2;
        const float pivot = __uint_as_float(mid);
        double part = 0;
        for (int64_t i = tid; i < V; i += BLOCK) part += w[i] > pivot ? w[i] : 0.f;
        if (block_sum<BLOCK>(part, s) < goal) hi = mid; else lo = mid;
      }
      const float pivot = __uint_as_float(hi);
      double part = 0;
      for (int64_t i = tid; i < V; i += BLOCK) part += w[i] > pivot ? w[i] : 0.f;
      const double above = block_sum<BLOCK>(part, s);
      keep_ties_in_id_order<BLOCK>(w, V, pivot,
                                   [above, goal, pivot](int rank) { return above + rank * static_cast<double>(pivot) < goal; }, s);
    }
    // min_p (relative to the top probability, w == 1), the argmax always kept; then the draw.
    const float min_w = p.min_p;
    const int64_t chunk = (V + BLOCK - 1) / BLOCK;
    const int64_t lo = imin(V, tid * chunk), hi = imin(V, lo + chunk);
    float mine = 0.f;
    for (int64_t i = lo; i < hi; ++i) {
      const float v = i == best.index ? 1.f : (w[i] >= min_w ? w[i] : 0.f);
      w[i] = v;
      mine += v;
    }
    float before, total;
    cub::BlockScan<float, BLOCK>(s.tmp.scan_f).ExclusiveSum(mine, before, total);
    if (tid == 0) s.chosen = INT_MAX;
    __syncthreads();
    const float target = static_cast<float>(philox_uniform(p.seed, p.step)) * total;
    if (mine > 0.f && before <= target && target < before + mine) {
      float cum = before;
      int64_t pick = -1, last = -1;
      for (int64_t i = lo; i < hi; ++i) {
        if (w[i] <= 0.f) continue;
        last = i;
        cum += w[i];
        if (cum > target) { pick = i; break; }
      }
      if (pick < 0) pick = last;
      atomicMin(&s.chosen, static_cast<int>(pick));
    }
    __syncthreads();
    token = s.chosen == INT_MAX ? best.index : s.chosen;
  }
  if (tid == 0) tokens[b] = token;
  if (logprobs != nullptr) {
    double part = 0;
    for (int64_t i = tid; i < V; i += BLOCK) part += exp(static_cast<double>(to_float<T>(row[i])) - raw_max);
    const double lse = block_sum<BLOCK>(part, s);
    if (tid == 0) logprobs[b] = static_cast<float>(static_cast<double>(to_float<T>(row[token])) - raw_max - log(lse));
  }
}

}  // namespace cuda
}  // namespace llama_fast
