// Host code of the CUDA sampler: arguments were validated by sample() (sampling_cpu.cpp); this copies the
// per-row parameters to the device and launches sampling_cuda.cuh's kernel, one block per row.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>
#include <vector>

#include "../torch/ext.h"
#include "sampling_cuda.cuh"

namespace llama_fast {

namespace {
constexpr int kBlock = 512;

template <typename T, typename Count>
void launch(const torch::Tensor& logits, int64_t row_stride, const Count* seen, int64_t seen_stride,
            const SampleParams* params, float* work, int64_t* tokens, float* logprobs, int* bad, cudaStream_t stream) {
  const int64_t B = logits.size(0), V = logits.size(1);
  cuda::sample_kernel<kBlock, T, Count><<<static_cast<unsigned>(B), kBlock, 0, stream>>>(
      reinterpret_cast<const T*>(logits.data_ptr()), row_stride, V, seen, seen_stride, params, work, tokens, logprobs,
      bad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_seen(const torch::Tensor& logits, int64_t row_stride, const std::optional<torch::Tensor>& seen,
                 const SampleParams* params, float* work, int64_t* tokens, float* logprobs, int* bad,
                 cudaStream_t stream) {
  if (!seen) {
    launch<T, int32_t>(logits, row_stride, nullptr, 0, params, work, tokens, logprobs, bad, stream);
  } else if (seen->scalar_type() == torch::kInt32) {
    launch<T, int32_t>(logits, row_stride, seen->data_ptr<int32_t>(), seen->stride(0), params, work, tokens, logprobs,
                       bad, stream);
  } else {
    launch<T, int64_t>(logits, row_stride, seen->data_ptr<int64_t>(), seen->stride(0), params, work, tokens, logprobs,
                       bad, stream);
  }
}
}  // namespace

std::tuple<torch::Tensor, std::optional<torch::Tensor>> sample_cuda(const torch::Tensor& logits_in,
                                                                    const void* rows, int64_t rows_bytes,
                                                                    const std::optional<torch::Tensor>& seen_in,
                                                                    bool return_logprobs) {
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const int64_t B = logits_in.size(0), V = logits_in.size(1);
  LF_CHECK_ARG(B <= 0x7FFFFFFF, "sample: batch too large for one launch");
  const auto dev = logits_in.device();
  auto tokens = torch::empty({B}, torch::TensorOptions().dtype(torch::kInt64).device(dev));
  std::optional<torch::Tensor> logprobs;
  if (return_logprobs) logprobs = torch::empty({B}, torch::TensorOptions().dtype(torch::kFloat32).device(dev));
  if (B == 0) return {tokens, logprobs};
  const auto logits = logits_in.stride(1) == 1 || V == 1 ? logits_in : logits_in.contiguous();
  const int64_t row_stride = logits.stride(1) == 1 || V == 1 ? logits.stride(0) : V;
  std::optional<torch::Tensor> seen;
  if (seen_in) seen = seen_in->contiguous();
  auto params_cpu = torch::empty({rows_bytes}, torch::kUInt8);
  std::memcpy(params_cpu.data_ptr(), rows, rows_bytes);
  const auto params = params_cpu.to(dev, /*non_blocking=*/false);
  auto work = torch::empty({B, V}, torch::TensorOptions().dtype(torch::kFloat32).device(dev));
  auto bad = torch::zeros({B}, torch::TensorOptions().dtype(torch::kInt32).device(dev));
  const auto stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const auto* pp = reinterpret_cast<const SampleParams*>(params.data_ptr());
  float* lp = return_logprobs ? logprobs->data_ptr<float>() : nullptr;
  switch (logits.scalar_type()) {
    case torch::kFloat32:
      launch_seen<float>(logits, row_stride, seen, pp, work.data_ptr<float>(), tokens.data_ptr<int64_t>(), lp,
                         bad.data_ptr<int>(), stream);
      break;
    case torch::kFloat16:
      launch_seen<__half>(logits, row_stride, seen, pp, work.data_ptr<float>(), tokens.data_ptr<int64_t>(), lp,
                          bad.data_ptr<int>(), stream);
      break;
    default:
      launch_seen<__nv_bfloat16>(logits, row_stride, seen, pp, work.data_ptr<float>(), tokens.data_ptr<int64_t>(), lp,
                                 bad.data_ptr<int>(), stream);
  }
  const auto bad_cpu = bad.cpu();
  std::string rows_bad;
  for (int64_t b = 0, n = 0; b < B; ++b)
    if (bad_cpu.data_ptr<int>()[b] && n++ < 16) rows_bad += (rows_bad.empty() ? "" : ", ") + std::to_string(b);
  LF_CHECK_ARG(rows_bad.empty(), "sample: logits contain NaN or inf in rows [", rows_bad, "]");
  return {tokens, logprobs};
}

}  // namespace llama_fast
