// Host code of the CUDA KV cache writes and block copies: arguments were validated by static_write /
// paged_write / copy_blocks (kv_cache_cpu.cpp); this launches kv_cache_cuda.cuh's kernel on the current
// stream. Block copies run in order (a later copy may read a block an earlier one wrote).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../torch/ext.h"
#include "kv_cache_cuda.cuh"

namespace llama_fast {

namespace {
template <typename U>
void launch_write(torch::Tensor& cache, const torch::Tensor& src, const torch::Tensor& start, const int32_t* table,
                  int64_t table_width, int64_t rows_per_seq, int64_t B, int64_t T, int64_t token_bytes,
                  cudaStream_t stream) {
  const int64_t units = token_bytes / static_cast<int64_t>(sizeof(U));
  const int threads = units >= 256 ? 256 : (units >= 32 ? 64 : 32);
  cuda::write_tokens_kernel<U><<<static_cast<unsigned>(B * T), threads, 0, stream>>>(
      reinterpret_cast<U*>(cache.data_ptr()), reinterpret_cast<const U*>(src.data_ptr()), start.data_ptr<int32_t>(),
      table, table_width, rows_per_seq, T, units);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void write(torch::Tensor& cache, const torch::Tensor& src_in, const torch::Tensor& start_in, const int32_t* table,
           int64_t table_width, int64_t rows_per_seq) {
  const auto src = src_in.contiguous();
  const auto start = start_in.contiguous();
  const int64_t B = src.size(0), T = src.size(1);
  LF_CHECK_ARG(B * T <= 0x7FFFFFFF, "KV cache write: too many tokens for one launch");
  const int64_t token_bytes = src.size(2) * src.size(3) * src.element_size();
  const auto stream = c10::cuda::getCurrentCUDAStream(cache.device().index()).stream();
  const auto aligned = [&](int64_t n) {
    return token_bytes % n == 0 && reinterpret_cast<uintptr_t>(cache.data_ptr()) % n == 0 &&
           reinterpret_cast<uintptr_t>(src.data_ptr()) % n == 0;
  };
  if (aligned(16)) {
    launch_write<uint4>(cache, src, start, table, table_width, rows_per_seq, B, T, token_bytes, stream);
  } else if (aligned(4)) {
    launch_write<uint32_t>(cache, src, start, table, table_width, rows_per_seq, B, T, token_bytes, stream);
  } else {
    launch_write<uint8_t>(cache, src, start, table, table_width, rows_per_seq, B, T, token_bytes, stream);
  }
}
}  // namespace

void static_write_cuda(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& k, const torch::Tensor& v,
                       const torch::Tensor& start) {
  const c10::cuda::CUDAGuard guard(k_cache.device());
  write(k_cache, k, start, nullptr, 0, k_cache.size(1));
  write(v_cache, v, start, nullptr, 0, v_cache.size(1));
}

void paged_write_cuda(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& k, const torch::Tensor& v,
                      const torch::Tensor& block_table, const torch::Tensor& start) {
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const auto table = block_table.contiguous();
  write(k_cache, k, start, table.data_ptr<int32_t>(), table.size(1), k_cache.size(1));
  write(v_cache, v, start, table.data_ptr<int32_t>(), table.size(1), v_cache.size(1));
}

void copy_blocks_cuda(std::vector<torch::Tensor>& k_caches, std::vector<torch::Tensor>& v_caches,
                      const torch::Tensor& ops) {
  const c10::cuda::CUDAGuard guard(k_caches[0].device());
  const auto stream = c10::cuda::getCurrentCUDAStream(k_caches[0].device().index()).stream();
  const int64_t* op = ops.data_ptr<int64_t>();
  const int64_t N = ops.size(0);
  const int64_t block_bytes = k_caches[0].size(1) * k_caches[0].size(2) * k_caches[0].size(3) * k_caches[0].element_size();
  const int64_t token_bytes = block_bytes / k_caches[0].size(1);
  for (int64_t i = 0; i < N; ++i) {
    if (op[3 * i] == op[3 * i + 1] || op[3 * i + 2] == 0) continue;
    for (auto* pools : {&k_caches, &v_caches}) {
      for (auto& pool : *pools) {
        char* base = static_cast<char*>(pool.data_ptr());
        C10_CUDA_CHECK(cudaMemcpyAsync(base + op[3 * i + 1] * block_bytes, base + op[3 * i] * block_bytes,
                                       op[3 * i + 2] * token_bytes, cudaMemcpyDeviceToDevice, stream));
      }
    }
  }
}

}  // namespace llama_fast
