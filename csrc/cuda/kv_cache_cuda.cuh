// CUDA KV cache writes (torch-free): one thread block per new token, copying its Hkv * D elements into a
// static (B, S_max, token) or paged (num_blocks, block_size, token) cache in units of U (16, 4 or 1 bytes).
#pragma once

#include <cstdint>

namespace llama_fast {
namespace cuda {

// Token (b, t) of src (B, T, units) goes to cache slot `slot`; table == nullptr: slot = b * S_max + pos.
template <typename U>
__global__ void write_tokens_kernel(U* __restrict__ cache, const U* __restrict__ src, const int32_t* __restrict__ start,
                                    const int32_t* __restrict__ table, int64_t table_width, int64_t rows_per_seq,
                                    int64_t T, int64_t units) {
  const int64_t b = blockIdx.x / T, t = blockIdx.x % T;
  const int64_t pos = start[b] + t;
  int64_t slot;
  if (table == nullptr) {
    slot = b * rows_per_seq + pos;  // rows_per_seq = S_max
  } else {
    slot = static_cast<int64_t>(table[b * table_width + pos / rows_per_seq]) * rows_per_seq + pos % rows_per_seq;
  }
  const U* from = src + (b * T + t) * units;
  U* to = cache + slot * units;
  for (int64_t i = threadIdx.x; i < units; i += blockDim.x) to[i] = from[i];
}

}  // namespace cuda
}  // namespace llama_fast
