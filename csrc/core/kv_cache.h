// KV cache on raw pointers: token copies into a static or paged pool (the paged cache's bookkeeping is
// block_manager.h). Torch-free. Every function here assumes arguments already validated by the host code.
#pragma once

#include <cstdint>
#include <cstring>

namespace llama_fast {

// ---- data movement ----

// Row b's T tokens (each `token_bytes` bytes: Hkv * D elements) go to positions start[b] + t of a
// contiguous cache (B, S_max, token).
inline void static_write_rows(char* cache, const char* src, const int32_t* start, int64_t B, int64_t T, int64_t S_max,
                              int64_t token_bytes, int64_t src_row_stride_bytes) {
#pragma omp parallel for collapse(2) if (B * T * token_bytes > (1 << 16))
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      std::memcpy(cache + (b * S_max + start[b] + t) * token_bytes, src + b * src_row_stride_bytes + t * token_bytes,
                  token_bytes);
}

// The same through a block table (B, max_blocks): position p lives in block table[b][p / bs] at p % bs.
inline void paged_write_rows(char* cache, const char* src, const int32_t* table, int64_t max_blocks,
                             const int32_t* start, int64_t B, int64_t T, int64_t block_size, int64_t token_bytes,
                             int64_t src_row_stride_bytes) {
#pragma omp parallel for collapse(2) if (B * T * token_bytes > (1 << 16))
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t pos = start[b] + t;
      const int64_t block = table[b * max_blocks + pos / block_size];
      std::memcpy(cache + (block * block_size + pos % block_size) * token_bytes,
                  src + b * src_row_stride_bytes + t * token_bytes, token_bytes);
    }
}

}  // namespace llama_fast
