// GGUF quantized weights as the CPU decode kernels take them: the weight types, their block layouts
// (exactly ggml's), the plain C++ dequantization of a row, and the quantized activations that the quantized
// matrix kernels (quant_isa.inc) multiply the stored blocks by: their scale rule and layout. Torch-free.
//
// The kernels multiply the stored integers by integers: each activation vector is quantized per block to
// int8 with one fp32 scale (as llama.cpp's Q8_0 for the 32-element types, Q8_K for the 256-element
// K-quants), the integer dot products of a block are exact, and only the per-block results meet floating
// point.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

namespace llama_fast {
namespace cpu_decode {

// The one weight type enum of the decode kernels and the session: plain floats, or a GGUF block type.
enum class WType { F32, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K };

struct WTypeInfo {
  const char* name;
  int block;  // elements per block (1 for plain floats)
  int bytes;  // bytes per block
};

// ggml's block layouts (ggml-common.h); fp16 is IEEE half, all little-endian:
//   Q8_0 (34 B / 32): fp16 d, int8 qs[32]; value qs[i] * d
//   Q4_0 (18 B / 32): fp16 d, uint8 qs[16]; element i < 16 is the low nibble of qs[i], i >= 16 the high
//                     nibble of qs[i - 16]; value (n - 8) * d
//   Q4_1 (20 B / 32): fp16 d, fp16 m, qs[16] as Q4_0; value n * d + m
//   Q5_0 (22 B / 32): fp16 d, uint8 qh[4] (bit i: element i's 5th bit), qs[16] as Q4_0; value (n - 16) * d
//   Q4_K (144 B / 256): fp16 d, fp16 dmin, scales[12] (8 6-bit scales and 8 6-bit mins, q4k_scales_mins),
//                       qs[128]; element 64p + i of sub-block pair p is the low nibble of qs[32p + i] (i <
//                       32) or the high nibble of qs[32p + i - 32]; value d * sc[j] * n - dmin * m[j], j =
//                       element / 32
//   Q6_K (210 B / 256): ql[128], qh[64], int8 scales[16], fp16 d; see q6k_value; value d * scales[e / 16] * (q - 32)
inline constexpr WTypeInfo kWTypeInfo[] = {{"F32", 1, 4},     {"BF16", 1, 2},    {"Q8_0", 32, 34},
                                           {"Q4_0", 32, 18},  {"Q4_1", 32, 20},  {"Q5_0", 32, 22},
                                           {"Q4_K", 256, 144}, {"Q6_K", 256, 210}};
constexpr const WTypeInfo& wtype_info(WType t) { return kWTypeInfo[static_cast<int>(t)]; }
constexpr const char* wtype_name(WType t) { return wtype_info(t).name; }
constexpr int block_size(WType t) { return wtype_info(t).block; }
constexpr int block_bytes(WType t) { return wtype_info(t).bytes; }
constexpr bool is_quantized(WType t) { return block_size(t) > 1; }
// Bytes of one row of K elements (K a multiple of the block).
inline int64_t row_bytes(WType t, int64_t K) { return K / block_size(t) * block_bytes(t); }

// "Q8_0, Q4_0, ...": the names of the types from `first` on, for messages.
inline std::string wtype_names(WType first = WType::F32) {
  std::string out;
  for (int i = static_cast<int>(first); i <= static_cast<int>(WType::Q6_K); ++i)
    out += (out.empty() ? "" : ", ") + std::string(kWTypeInfo[i].name);
  return out;
}

// The type called `name` ("F32", "BF16", "Q8_0", ..., or torch's "float32" / "bfloat16"); false if none.
inline bool parse_wtype(const std::string& name, WType& t) {
  if (name == "float32" || name == "bfloat16") {
    t = name == "float32" ? WType::F32 : WType::BF16;
    return true;
  }
  for (int i = 0; i <= static_cast<int>(WType::Q6_K); ++i)
    if (name == wtype_info(static_cast<WType>(i)).name) {
      t = static_cast<WType>(i);
      return true;
    }
  return false;
}

// ---- Plain C++ dequantization (the embedding row lookup, tests) ----

// IEEE half to float, exact (subnormals, inf and NaN included).
inline float fp16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float f = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  const uint32_t bits = sign | (exp == 0x1f ? 0x7f800000u : (exp + 112) << 23) | (man << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
inline uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline float load_fp16(const uint8_t* p) { return fp16_to_f32(load_u16(p)); }

// The 8 scales and 8 mins (6 bits each, one byte each in sc and m, sub-block j in byte j) of a Q4_K block
// from its 12 packed bytes: the first four whole in the low bits of bytes 0-7, the last four split over the
// nibbles of bytes 8-11 and the top bits of bytes 0-7.
inline void q4k_scales_mins(const uint8_t* s, uint64_t& sc, uint64_t& m) {
  const uint32_t w0 = load_u32(s), w1 = load_u32(s + 4), w2 = load_u32(s + 8);
  const uint32_t sc_hi = (w2 & 0x0f0f0f0fu) | ((w0 >> 2) & 0x30303030u);
  const uint32_t m_hi = ((w2 >> 4) & 0x0f0f0f0fu) | ((w1 >> 2) & 0x30303030u);
  sc = (w0 & 0x3f3f3f3fu) | static_cast<uint64_t>(sc_hi) << 32;
  m = (w1 & 0x3f3f3f3fu) | static_cast<uint64_t>(m_hi) << 32;
}

// The unsigned 6-bit value (0..63) of element e (0..255) of a Q6_K block: each half of 128 elements has
// ql[64] (low nibbles: e < 64 from the low, the rest from the high nibbles of ql[e % 64]) and qh[32] (2 bits
// of each of the 4 elements 32 apart).
inline int q6k_value(const uint8_t* blk, int e) {
  const uint8_t* ql = blk + 64 * (e / 128);
  const uint8_t* qh = blk + 128 + 32 * (e / 128);
  const int i = e % 128, l = i % 32, quarter = i / 32;
  const int low = (quarter & 1 ? ql[l + 32] : ql[l]) >> (quarter & 2 ? 4 : 0) & 0xF;
  return low | ((qh[l] >> (2 * quarter)) & 3) << 4;
}

// out[0, K) = row (K elements of type t, K a multiple of the block) in fp32, computed as ggml and the gguf
// package compute it (each product and sum rounded to fp32 in their order), so the values agree exactly.
inline void dequantize_row(WType t, const void* row, int K, float* out) {
  const uint8_t* p = static_cast<const uint8_t*>(row);
  const int nblk = K / block_size(t), bb = block_bytes(t);
  switch (t) {
    case WType::F32: std::memcpy(out, row, sizeof(float) * K); return;
    case WType::BF16:
      for (int i = 0; i < K; ++i) out[i] = bf16_to_f32(load_u16(p + 2 * i));
      return;
    case WType::Q8_0:
      for (int b = 0; b < nblk; ++b, p += bb)
        for (int i = 0; i < 32; ++i) out[32 * b + i] = static_cast<float>(static_cast<int8_t>(p[2 + i])) * load_fp16(p);
      return;
    case WType::Q4_0:
    case WType::Q4_1:
    case WType::Q5_0:
      for (int b = 0; b < nblk; ++b, p += bb) {
        const float d = load_fp16(p);
        const uint8_t* qs = p + (t == WType::Q4_0 ? 2 : t == WType::Q4_1 ? 4 : 6);
        const uint32_t qh = t == WType::Q5_0 ? load_u32(p + 2) : 0;
        for (int i = 0; i < 32; ++i) {
          const int n = (i < 16 ? qs[i] & 0xF : qs[i - 16] >> 4) | static_cast<int>((qh >> i) & 1) << 4;
          float& y = out[32 * b + i];
          if (t == WType::Q4_1) {
            const float dn = d * static_cast<float>(n);
            y = dn + load_fp16(p + 2);
          } else {
            y = d * static_cast<float>(n - (t == WType::Q4_0 ? 8 : 16));
          }
        }
      }
      return;
    case WType::Q4_K:
      for (int b = 0; b < nblk; ++b, p += bb)
        for (int j = 0; j < 8; ++j) {
          uint64_t sc, m;
          q4k_scales_mins(p + 4, sc, m);
          const float d = load_fp16(p) * static_cast<float>(sc >> 8 * j & 0xff);
          const float dm = load_fp16(p + 2) * static_cast<float>(m >> 8 * j & 0xff);
          const uint8_t* qs = p + 16 + 32 * (j / 2);
          for (int i = 0; i < 32; ++i) {
            const float dn = d * static_cast<float>(j % 2 ? qs[i] >> 4 : qs[i] & 0xF);
            out[256 * b + 32 * j + i] = dn - dm;
          }
        }
      return;
    case WType::Q6_K:
      for (int b = 0; b < nblk; ++b, p += bb)
        for (int e = 0; e < 256; ++e) {
          const float ds = load_fp16(p + 208) * static_cast<float>(static_cast<int8_t>(p[192 + e / 16]));
          out[256 * b + e] = ds * static_cast<float>(q6k_value(p, e) - 32);
        }
      return;
  }
}

// ---- The activations as the quantized kernels read them ----
//
// Each activation vector is quantized per block of 32 (the 32-element weight types) or 256 (K-quants)
// elements: d = act_scale(max |x|), q = round-half-even(x * act_inverse(d)), |q| <= 127; a block with a NaN
// or an inf gets d = NaN (its integers do not matter), a block of tiny values d = 0. Every ISA quantizes
// (quant_isa.inc's quantize_activations) with IEEE operations alone (a maximum, one division, products
// rounded once, conversion to nearest even), so all of them get the same integers. The
// kernel reads one "pack" per vector, its bytes laid out for the weight type and the kernel's vector width
// (`lanes`, int32 lanes: 16, 8 or 1):
//
// 32-element types: a block's integer dot product is summed in int32 lanes, 8 per block for Q8_0 (lane i:
// elements 4i..4i+3) and 4 for the nibble types (lane i: the 8 elements in the 4 bytes qs[4i..4i+3], 4i..4i+3
// and 16+4i..16+4i+3, so one lane takes both nibbles of a byte). The pack is in units of U = lanes / (lanes
// per block) blocks (at least 1; the last unit padded with zeros), each unit:
//   int8 q[32 U]           Q8_0: the blocks in order; nibble types: elements 0..15 of each block, then
//                          elements 16..31 of each (the low nibbles of a unit in one register, the high in another)
//   4-byte aux[lanes of U] (block k's lane i at k * lanes per block + i):
//                            Q4_0 / Q5_0, and Q8_0 where the kernel offsets the weights by 128 (u8 x s8 dot
//                            products, AVX512-VNNI): int32 -offset * (sum of the lane's q), which turns the
//                            dot product of the unsigned stored weights into that of the signed ones;
//                            Q4_1: fp32 (sum of the lane's q) * d, for the block's min term; else 0
//   fp32 dx[lanes of U]    each lane's d
// K-quants, per block of 256, 320 bytes:
//   int8 q[256]            for Q4_K with 16 lanes, its sub-blocks of 32 in the order 0, 2, 1, 3, 4, 6, 5, 7 (as a
//                          64-byte load of nibbles holds them), else in order
//   int16 sums[16]         the sums of q over each 16 elements (in element order)
//   fp32 d; 28 bytes of padding
struct ActSpec {
  WType wtype;  // the weight type the activations meet
  int lanes;    // the kernel's vector width in int32 lanes
  bool vnni;    // Q8_0 weights offset by 128 for u8 x s8 dot products (else signed, nothing to correct)
};

constexpr int kActKBlockBytes = 320;

constexpr bool act_kquant(const ActSpec& s) { return block_size(s.wtype) == 256; }
constexpr int act_lanes_per_block(WType t) { return t == WType::Q8_0 ? 8 : 4; }
constexpr int act_unit_blocks(const ActSpec& s) {
  return s.lanes > act_lanes_per_block(s.wtype) ? s.lanes / act_lanes_per_block(s.wtype) : 1;
}
constexpr int act_unit_lanes(const ActSpec& s) { return act_unit_blocks(s) * act_lanes_per_block(s.wtype); }
constexpr int act_unit_bytes(const ActSpec& s) { return 32 * act_unit_blocks(s) + 8 * act_unit_lanes(s); }

// Where element e of block k of a unit sits among the unit's q.
constexpr int act_q_at(const ActSpec& s, int k, int e) {
  if (act_lanes_per_block(s.wtype) == 8) return 32 * k + e;
  return e < 16 ? 16 * k + e : 16 * act_unit_blocks(s) + 16 * k + e - 16;
}

// Where a unit's aux and dx lanes start.
constexpr int act_aux_at(const ActSpec& s) { return 32 * act_unit_blocks(s); }
constexpr int act_dx_at(const ActSpec& s) { return act_aux_at(s) + 4 * act_unit_lanes(s); }

// The unsigned offset of the stored weights that the lane sums correct for (0: none, or Q4_1's min).
constexpr int act_offset(const ActSpec& s) {
  switch (s.wtype) {
    case WType::Q4_0: return 8;
    case WType::Q5_0: return 16;
    case WType::Q8_0: return s.vnni ? 128 : 0;
    default: return 0;
  }
}

// The sub-block of 32 elements that slot j (0..7) of a K-quant pack block holds (an involution).
constexpr int act_subblock(const ActSpec& s, int j) {
  // 0, 2, 1, 3, 4, 6, 5, 7 (bits 0 and 1 swapped): a 64-byte load of nibbles holds sub-blocks 0 and 2, 1 and 3
  return s.lanes == 16 && s.wtype == WType::Q4_K ? (j & 4) | (j & 1) << 1 | (j & 2) >> 1 : j;
}

// Bytes of one vector's pack (a multiple of 64).
inline size_t act_bytes(const ActSpec& s, int K) {
  if (act_kquant(s)) return static_cast<size_t>(K / 256) * kActKBlockBytes;
  const int units = (K / 32 + act_unit_blocks(s) - 1) / act_unit_blocks(s);
  return (static_cast<size_t>(units) * act_unit_bytes(s) + 63) / 64 * 64;
}

// d of a block whose largest magnitude is amax: amax / 127 rounded up to 16 significant bits, so that every
// d * q (|q| <= 127) is exact in fp32 (what the kernels multiply by is then exactly representable, for tests).
// A block holding inf or NaN gets NaN (its products are not finite anyway); one so small that 1 / d would
// overflow (amax < 127 FLT_MIN) gets 0, a block of zeros: on every ISA, which would otherwise each round
// x * inf differently.
inline float act_scale(float amax) {
  if (!(amax <= std::numeric_limits<float>::max())) return std::numeric_limits<float>::quiet_NaN();
  if (amax < 127.0f * std::numeric_limits<float>::min()) return 0.0f;
  const float d = amax / 127.0f;
  uint32_t u;
  std::memcpy(&u, &d, 4);
  u = (u + 0xffu) & ~0xffu;  // up (d >= 0): |x| / d <= 127 still
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

// 1 / d, the factor x is multiplied by before rounding; 0 for a block of zeros (or a NaN d).
inline float act_inverse(float d) { return d > 0.0f ? 1.0f / d : 0.0f; }

// The values the kernels multiply the weights by: out[0, K) = d * q of the pack (exact in fp32).
inline void dequantize_activations(const ActSpec& s, const uint8_t* pack, int K, float* out) {
  if (act_kquant(s)) {
    for (int b = 0; b < K / 256; ++b) {
      const uint8_t* blk = pack + static_cast<size_t>(b) * kActKBlockBytes;
      float d;
      std::memcpy(&d, blk + 288, 4);
      for (int j = 0; j < 8; ++j) {
        for (int i = 0; i < 32; ++i)
          out[256 * b + 32 * act_subblock(s, j) + i] = d * static_cast<float>(static_cast<int8_t>(blk[32 * j + i]));
      }
    }
    return;
  }
  const int U = act_unit_blocks(s);
  for (int b = 0; b < K / 32; ++b) {
    const uint8_t* unit = pack + static_cast<size_t>(b / U) * act_unit_bytes(s);
    const int k = b % U;
    float d;
    std::memcpy(&d, unit + act_dx_at(s) + 4 * k * act_lanes_per_block(s.wtype), 4);
    for (int e = 0; e < 32; ++e) out[32 * b + e] = d * static_cast<float>(static_cast<int8_t>(unit[act_q_at(s, k, e)]));
  }
}

}  // namespace cpu_decode
}  // namespace llama_fast
