// CpuDecoder: the whole decode step of a LLaMA-family model on CPU in one call (see cpu_decode.h).
#pragma once

#include <torch/extension.h>

#include <mutex>
#include <optional>
#include <tuple>
#include <string>
#include <vector>

#include "cpu_decode.h"

namespace llama_fast {

class CpuDecoder {
 public:
  // Weights are used in place (no copies, except the small norm vectors, kept as fp32): the model must keep
  // them unchanged while the decoder lives. All matrices share one dtype, float32 or bfloat16.
  // window 0: none; logit_softcap 0: off; bucket_table: (n_heads, max_distance + 1) fp32, the bias of
  // span d is bucket_table[h, min(d, max_distance)]; num_threads 0: torch's thread count;
  // isa: "auto" (or $LLAMA_FAST_CPU_ISA), "avx512", "avx2", "scalar".
  CpuDecoder(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps, torch::Tensor embedding,
             torch::Tensor output, torch::Tensor final_norm, std::vector<torch::Tensor> attn_norm,
             std::vector<torch::Tensor> wq, std::vector<torch::Tensor> wk, std::vector<torch::Tensor> wv,
             std::vector<torch::Tensor> wo, std::vector<torch::Tensor> ffn_norm, std::vector<torch::Tensor> w1,
             std::vector<torch::Tensor> w2, std::vector<torch::Tensor> w3, torch::Tensor rope_table,
             std::optional<torch::Tensor> alibi_slopes, std::optional<torch::Tensor> bucket_table, int64_t window,
             int64_t sink_tokens, double logit_softcap, double scale, int64_t num_threads, const std::string& isa);

  // rope_table: (positions, rot_dim) fp32 [cos | sin]; positions beyond it are refused by step().
  void set_rope_table(torch::Tensor table);

  // One token per row: tokens (B,) int64; seqlens (B,) int32, the committed length of each row, which is
  // where the new token's K/V go (and its position); k_cache, v_cache: per layer (B, S_max, Hkv, D) fp32 or
  // bf16. Appends K/V, advances seqlens by one in place, returns logits (B, vocab) fp32.
  torch::Tensor step(const torch::Tensor& tokens, const torch::Tensor& seqlens,
                     const std::vector<torch::Tensor>& k_cache, const std::vector<torch::Tensor>& v_cache);

  std::string isa() const;
  int num_threads() const { return num_threads_; }
  void set_num_threads(int64_t n) {
    TORCH_CHECK(n >= 1 && n <= 1024, "CpuDecoder: num_threads must be in [1, 1024], got ", n);
    num_threads_ = static_cast<int>(n);
  }

 private:
  torch::Tensor weight(const torch::Tensor& t, int64_t rows, int64_t cols, const std::string& name);
  torch::Tensor vector(const torch::Tensor& t, int64_t n, const std::string& name);

  cpu_decode::Isa isa_;
  torch::ScalarType wdtype_;
  cpu_decode::ModelDesc desc_{};
  std::vector<cpu_decode::LayerWeights> layers_;
  std::vector<cpu_decode::HeadSpan> span_;
  std::vector<torch::Tensor> keep_;  // keeps every tensor the pointers above point into alive
  torch::Tensor rope_;
  std::vector<float> workspace_;
  std::mutex mutex_;
  int num_threads_ = 1;
};

// Refuse (TORCH_CHECK) anything but a defined, contiguous CPU tensor (of float32, for the second); the
// message starts with `who` (the op) and names the argument.
void check_cpu_tensor(const torch::Tensor& t, const char* who, const std::string& name);
void check_cpu_fp32(const torch::Tensor& t, const char* who, const std::string& name);

// y (B, N) fp32 = x (B, K) fp32 times weight (N, K) fp32/bf16 transposed, with the decode step's kernels.
torch::Tensor cpu_matvec(const torch::Tensor& weight, const torch::Tensor& x, int64_t num_threads,
                         const std::string& isa);

// Attention of T new queries per row over a contiguous KV cache that already holds them, with the span bias
// (docs/ARCHITECTURE.md section 3), computed as the decode step computes it. q (B, T, H, D) fp32; k_cache, v_cache
// (B, S_max, Hkv, D) fp32 or bf16; seqlens (B,) int32, each row's length including the T new tokens, so
// query t of row b sits at position seqlens[b] - T + t. Span arguments as CpuDecoder's. -> (B, T, H, D) fp32.
torch::Tensor cpu_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                            const torch::Tensor& seqlens, const std::optional<torch::Tensor>& alibi_slopes,
                            const std::optional<torch::Tensor>& bucket_table, int64_t window, int64_t sink_tokens,
                            double logit_softcap, double scale, int64_t num_threads, const std::string& isa);

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
