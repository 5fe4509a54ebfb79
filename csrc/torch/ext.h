// Host entry points of llama_fast._C (ATen types). Each validates every argument with TORCH_CHECK (which
// pybind11 turns into a Python RuntimeError / ValueError / IndexError / TypeError) and dispatches to the
// torch-free kernels: CPU (csrc/*_cpu.cpp) or CUDA (csrc/*_cuda.cu, only when built with CUDA).
#pragma once

#include <torch/types.h>

#include <optional>
#include <tuple>

namespace llama_fast {

// ---- sampling (sampling_cpu.cpp; CUDA: sampling_cuda.cu) ----
// logits (B, V) fp32/fp16/bf16; params (B, 7) fp64 rows [temperature, top_k, top_p, min_p,
// repetition_penalty, presence_penalty, frequency_penalty]; seeds, steps (B,) int64 >= 0;
// seen (B, V) int32/int64 counts or None. Returns (tokens (B,) int64, logprobs (B,) fp32 or None):
// logprobs are log_softmax of the raw logits at the chosen tokens.
std::tuple<torch::Tensor, std::optional<torch::Tensor>> sample(const torch::Tensor& logits,
                                                               const torch::Tensor& params,
                                                               const torch::Tensor& seeds,
                                                               const torch::Tensor& steps,
                                                               const std::optional<torch::Tensor>& seen,
                                                               bool return_logprobs);
// The penalised logits (B, V) fp32 (for tests: must equal reference.apply_penalties exactly).
torch::Tensor apply_penalties(const torch::Tensor& logits, const torch::Tensor& seen, const torch::Tensor& params);

// ---- KV cache data movement (kv_cache_cpu.cpp; CUDA: kv_cache_cuda.cu) ----
// Static cache: k_cache, v_cache (B, S_max, Hkv, D); k, v (B, T, Hkv, D); start (B,) int32: row b's T
// tokens go to positions start[b] .. start[b] + T - 1.
void static_write(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& k, const torch::Tensor& v,
                  const torch::Tensor& start);
// Paged cache: k_cache, v_cache (num_blocks, block_size, Hkv, D); k, v (B, T, Hkv, D); block_table
// (B, max_blocks) int32; start (B,) int32 as above, positions mapped through the block table.
void paged_write(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& k, const torch::Tensor& v,
                 const torch::Tensor& block_table, const torch::Tensor& start);
// For every layer's pool: copies the first copy_tokens[i] token slots of block src[i] into block dst[i].
// ops (N, 3) int64 rows [src, dst, tokens].
void copy_blocks(std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches, const torch::Tensor& ops);
// The first `length` tokens of one sequence of a paged pool (num_blocks, block_size, Hkv, D) as a
// contiguous (length, Hkv, D) tensor; block_ids (n,) int32.
torch::Tensor gather_paged(const torch::Tensor& cache, const torch::Tensor& block_ids, int64_t length);

// The paged cache's bookkeeping (block_manager.h's BlockManager, the session's too) with tensor results for Python.
class PagedBlockManager {
 public:
  PagedBlockManager(int64_t num_blocks, int64_t block_size);
  ~PagedBlockManager();
  PagedBlockManager(const PagedBlockManager&) = delete;
  PagedBlockManager& operator=(const PagedBlockManager&) = delete;
  int64_t num_blocks() const;
  int64_t block_size() const;
  int64_t num_free_blocks() const;
  int64_t num_sequences() const;
  int32_t refcount(int64_t block) const;
  int64_t add_sequence();
  int64_t fork(int64_t parent);
  void free(int64_t seq);
  bool contains(int64_t seq) const;
  int64_t length(int64_t seq) const;
  int64_t evicted(int64_t seq) const;
  std::vector<int32_t> blocks(int64_t seq) const;
  // Pending block copies (N, 3) int64 [src, dst, tokens] the caller must run (copy_blocks) before reading.
  torch::Tensor evict(const std::vector<int64_t>& seqs, int64_t window, int64_t sinks);
  // Free blocks reserve(seqs, num_new) would take.
  int64_t blocks_needed(const std::vector<int64_t>& seqs, int64_t num_new) const;
  // (start (B,) int32, copies (N, 3) int64); raises KVCacheFull (state unchanged) when out of blocks.
  std::tuple<torch::Tensor, torch::Tensor> reserve(const std::vector<int64_t>& seqs, int64_t num_new, int64_t max_length);
  void commit(const std::vector<int64_t>& seqs, const std::vector<int64_t>& kept);
  // (B, max(width, longest table)) int32, padded with block 0.
  torch::Tensor block_table(const std::vector<int64_t>& seqs, int64_t min_width) const;

 private:
  struct Impl;
  Impl* impl_;
};

#ifdef LLAMA_FAST_WITH_CUDA
// Arguments already validated by sample(); rows holds the per-row SampleParams (sampling.h) as raw bytes.
std::tuple<torch::Tensor, std::optional<torch::Tensor>> sample_cuda(const torch::Tensor& logits,
                                                                    const void* rows, int64_t rows_bytes,
                                                                    const std::optional<torch::Tensor>& seen,
                                                                    bool return_logprobs);
void static_write_cuda(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& k,
                       const torch::Tensor& v, const torch::Tensor& start);
void paged_write_cuda(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& k,
                      const torch::Tensor& v, const torch::Tensor& block_table, const torch::Tensor& start);
void copy_blocks_cuda(std::vector<torch::Tensor>& k_caches, std::vector<torch::Tensor>& v_caches,
                      const torch::Tensor& ops);
#endif

// Shared argument checks (check.cpp-free: inline helpers).
inline std::string shape_str(const torch::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

}  // namespace llama_fast

#define LF_CHECK_ARG(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
#define LF_CHECK_INDEX(cond, ...) TORCH_CHECK_INDEX(cond, __VA_ARGS__)
#define LF_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, __VA_ARGS__)
