// The C++ CPU kernels (cpu_decode.h) as torch ops for the PyTorch forward on CPU (llama_fast.ops): checked
// host code around the kernels the decode session (session.h) runs.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <string>
#include <vector>

#include "../core/cpu_decode.h"

namespace llama_fast {

// Refuse (TORCH_CHECK) anything but a defined, contiguous CPU tensor (of float32, for the second); the
// message starts with `who` (the op) and names the argument.
void check_cpu_tensor(const torch::Tensor& t, const char* who, const std::string& name);
void check_cpu_fp32(const torch::Tensor& t, const char* who, const std::string& name);

// y (B, N) fp32 = x (B, K) fp32 times weight (N, K) fp32/bf16 transposed, with the decode step's kernels; with
// wtype a GGUF block type (quant.h), weight is its raw blocks, uint8 (N, row bytes of K = x.size(1)).
torch::Tensor cpu_matvec(const torch::Tensor& weight, const torch::Tensor& x, int64_t num_threads,
                         const std::string& isa, const std::string& wtype);

// raw uint8 (N, row bytes) rows of K elements of type wtype -> (N, K) fp32, as ggml dequantizes them.
torch::Tensor cpu_dequantize(const torch::Tensor& raw, const std::string& wtype, int64_t K);

// x (B, K) fp32 as the kernels of `isa` multiply weights of type wtype by it: its per-block int8 quantization,
// dequantized (B, K) fp32 (every value exact in fp32).
torch::Tensor cpu_quantize_activations(const torch::Tensor& x, const std::string& wtype, const std::string& isa);

// Attention of T new queries per row over a KV cache that already holds them, with the span bias
// (docs/ARCHITECTURE.md section 3), computed as the decode step computes it. q (B, T, H, D) fp32; k_cache, v_cache
// (B, S_max, Hkv, D) fp32 or bf16, or with block_table (B, max_blocks) int32 a paged pool (num_blocks,
// block_size, Hkv, D) whose row b holds token n at [block_table[b, n / block_size], n % block_size];
// seqlens (B,) int32, each row's length including the T new tokens, so
// query t of row b sits at position seqlens[b] - T + t. window 0: none; logit_softcap 0: off; bucket_table:
// (H, max_distance + 1) fp32, the bias of span d is bucket_table[h, min(d, max_distance)]. Sinks past the
// window are scored from sink_position(t) with q_sink (the queries rotated there; absent: q). -> (B, T, H, D) fp32.
torch::Tensor cpu_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                            const torch::Tensor& seqlens, const std::optional<torch::Tensor>& alibi_slopes,
                            const std::optional<torch::Tensor>& bucket_table, int64_t window, int64_t sink_tokens,
                            double logit_softcap, double scale, const std::optional<torch::Tensor>& q_sink,
                            const std::optional<torch::Tensor>& block_table, int64_t num_threads,
                            const std::string& isa);

// The elementwise ops of the PyTorch forward on fp32 CPU tensors (ops_cpu.cpp), as reference.py defines them.
// rms_norm of x (..., dim), or of x + residual: returns (normed, x + residual) (the sum is x itself without
// a residual).
std::tuple<torch::Tensor, torch::Tensor> cpu_rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                                                      const std::optional<torch::Tensor>& residual);
// Rotates q (..., Hq, D) and k (..., Hk, D) in place (rotate-half layout) at positions (...) int32/int64 of
// the [cos | sin] table (P, rot_dim).
void cpu_rope(torch::Tensor& q, torch::Tensor& k, const torch::Tensor& positions, const torch::Tensor& table);
// silu(gate) * up.
torch::Tensor cpu_swiglu(const torch::Tensor& gate, const torch::Tensor& up);

}  // namespace llama_fast
