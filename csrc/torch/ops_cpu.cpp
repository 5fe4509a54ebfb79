// Host side of the elementwise CPU ops of the PyTorch forward (prefill, paged batches, decode="eager"):
// RMSNorm (with the residual add fused), RoPE in place, SwiGLU, on fp32 tensors, with the decode step's
// own loops (cpu_decode.h). Every argument is checked here; rows are split over torch's threads.
#include <ATen/Parallel.h>

#include "decode_cpu.h"

namespace llama_fast {

namespace cd = cpu_decode;

std::tuple<torch::Tensor, torch::Tensor> cpu_rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps,
                                                      const std::optional<torch::Tensor>& residual) {
  check_cpu_fp32(x, "cpu_rms_norm", "x");
  check_cpu_fp32(weight, "cpu_rms_norm", "weight");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1) && x.size(-1) >= 1,
              "cpu_rms_norm: weight must be (", x.dim() >= 1 ? x.size(-1) : 0, ",), got ", weight.sizes());
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), "cpu_rms_norm: eps must be >= 0");
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  torch::Tensor sum = x;
  if (residual.has_value() && residual->defined()) {
    check_cpu_fp32(*residual, "cpu_rms_norm", "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "cpu_rms_norm: residual must have x's shape ", x.sizes(), ", got ",
                residual->sizes());
    sum = torch::empty_like(x);
  }
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* rp = sum.is_same(x) ? nullptr : residual->data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const size_t at = static_cast<size_t>(r) * dim;
      if (rp != nullptr)
        for (int64_t i = 0; i < dim; ++i) sp[at + i] = xp[at + i] + rp[at + i];
      cd::rms_norm(sp + at, wp, static_cast<int>(dim), static_cast<float>(eps), op + at);
    }
  });
  return {out, sum};
}

void cpu_rope(torch::Tensor& q, torch::Tensor& k, const torch::Tensor& positions, const torch::Tensor& table) {
  check_cpu_fp32(q, "cpu_rope", "q");
  check_cpu_fp32(k, "cpu_rope", "k");
  check_cpu_fp32(table, "cpu_rope", "cos_sin_cache");
  TORCH_CHECK(q.dim() >= 2 && k.dim() == q.dim() && q.size(-1) == k.size(-1),
              "cpu_rope: q (..., Hq, D) and k (..., Hk, D) must share their leading dims and D, got ", q.sizes(),
              " and ", k.sizes());
  const int64_t D = q.size(-1), Hq = q.size(-2), Hk = k.size(-2);
  TORCH_CHECK(q.sizes().slice(0, q.dim() - 2) == k.sizes().slice(0, k.dim() - 2) &&
                  positions.sizes() == q.sizes().slice(0, q.dim() - 2),
              "cpu_rope: positions must have the leading dims of q and k ", q.sizes().slice(0, q.dim() - 2), ", got ",
              positions.sizes());
  TORCH_CHECK(table.dim() == 2 && table.size(1) % 2 == 0 && table.size(1) >= 2 && table.size(1) <= D,
              "cpu_rope: cos_sin_cache must be (positions, rot_dim) with an even rot_dim <= head_dim (", D, "), got ",
              table.sizes());
  TORCH_CHECK(positions.device().is_cpu() && (positions.scalar_type() == torch::kInt64 ||
                                              positions.scalar_type() == torch::kInt32),
              "cpu_rope: positions must be int32 or int64 on the CPU, got ", positions.scalar_type());
  const auto pos = positions.to(torch::kInt64).contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t n = pos.numel(), rows = table.size(0);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(pp[i] >= 0 && pp[i] < rows, "cpu_rope: position ", pp[i], " is outside the RoPE table [0, ", rows, ")");
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  const float* tp = table.data_ptr<float>();
  const int rot = static_cast<int>(table.size(1));
  at::parallel_for(0, n, 8, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float* cs = tp + pp[i] * rot;
      for (int64_t h = 0; h < Hq; ++h) cd::rope(qp + (i * Hq + h) * D, cs, rot);
      for (int64_t h = 0; h < Hk; ++h) cd::rope(kp + (i * Hk + h) * D, cs, rot);
    }
  });
}

torch::Tensor cpu_swiglu(const torch::Tensor& gate, const torch::Tensor& up) {
  check_cpu_fp32(gate, "cpu_swiglu", "gate");
  check_cpu_fp32(up, "cpu_swiglu", "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "cpu_swiglu: gate and up must have one shape, got ", gate.sizes(), " and ",
              up.sizes());
  auto out = torch::empty_like(gate);
  const float* g = gate.data_ptr<float>();
  const float* u = up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const auto silu_mul = cd::kernels_for(cd::best_isa()).silu_mul;
  at::parallel_for(0, gate.numel(), 4096, [&](int64_t lo, int64_t hi) { silu_mul(g + lo, u + lo, o + lo, hi - lo); });
  return out;
}

}  // namespace llama_fast
