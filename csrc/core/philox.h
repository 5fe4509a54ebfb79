// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a counter-based
// random number generator. A row's draw is a pure function of (seed, step): the key is the 64-bit seed,
// the counter is the 64-bit step. Torch-free; usable from host and device code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LLAMA_FAST_HD __host__ __device__ __forceinline__
#else
#define LLAMA_FAST_HD inline
#endif

namespace llama_fast {

struct Philox4x32 {
  uint32_t v[4];
};

LLAMA_FAST_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Ten rounds of Philox4x32 on counter (c0..c3) with key (k0, k1).
LLAMA_FAST_HD Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                       uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, c0, hi0, lo0);
    philox_mulhilo(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0; c1 = n1; c2 = n2; c3 = n3;
    k0 += kW0;
    k1 += kW1;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// The uniform double in [0, 1) (53 random bits) of a row's draw number `step` under `seed`.
LLAMA_FAST_HD double philox_uniform(uint64_t seed, uint64_t step) {
  const Philox4x32 r = philox4x32_10(static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32),
                                     0x5A4D504Cu /* "sample" stream */, 0u, static_cast<uint32_t>(seed),
                                     static_cast<uint32_t>(seed >> 32));
  const uint64_t bits = (static_cast<uint64_t>(r.v[0] >> 5) << 26) | static_cast<uint64_t>(r.v[1] >> 6);
  return static_cast<double>(bits) * (1.0 / 9007199254740992.0);  // / 2^53
}

}  // namespace llama_fast
