// Host code of the sampler: validates every argument, then runs sampling.h per row (OpenMP over rows) on
// CPU tensors, or dispatches to sampling_cuda.cu for CUDA tensors.
#include <omp.h>

#include <cmath>
#include <string>
#include <vector>

#include "ext.h"
#include "../core/sampling.h"

namespace llama_fast {
namespace {

constexpr int kNumParams = 7;

LogitType logit_type(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return LogitType::kF32;
    case torch::kFloat16: return LogitType::kF16;
    case torch::kBFloat16: return LogitType::kBF16;
    default: break;
  }
  LF_CHECK_TYPE(false, "sample: logits must be float32, float16 or bfloat16, got ", t.scalar_type());
  return LogitType::kF32;
}

// Checks params/seeds/steps/seen against logits (B, V) and returns the per-row parameters.
std::vector<SampleParams> check_sample_args(const torch::Tensor& logits, const torch::Tensor& params,
                                            const torch::Tensor& seeds, const torch::Tensor& steps,
                                            const std::optional<torch::Tensor>& seen) {
  LF_CHECK_ARG(logits.dim() == 2, "sample: logits must have shape (B, V), got ", shape_str(logits));
  logit_type(logits);
  const int64_t B = logits.size(0), V = logits.size(1);
  LF_CHECK_ARG(V >= 1, "sample: logits need at least one column (V >= 1)");
  LF_CHECK_ARG(V < (int64_t(1) << 31), "sample: vocabulary size ", V, " exceeds 2^31 - 1");
  LF_CHECK_ARG(logits.is_cpu() || logits.is_cuda(), "sample: logits must be on CPU or CUDA, got ", logits.device());
  LF_CHECK_TYPE(params.scalar_type() == torch::kFloat64, "sample: params must be float64, got ", params.scalar_type());
  LF_CHECK_ARG(params.is_cpu(), "sample: params must be a CPU tensor");
  LF_CHECK_ARG(params.dim() == 2 && params.size(0) == B && params.size(1) == kNumParams,
               "sample: params must have shape (B=", B, ", ", kNumParams, "), got ", shape_str(params));
  for (const auto* t : {&seeds, &steps}) {
    const char* name = t == &seeds ? "seeds" : "steps";
    LF_CHECK_TYPE(t->scalar_type() == torch::kInt64, "sample: ", name, " must be int64, got ", t->scalar_type());
    LF_CHECK_ARG(t->is_cpu(), "sample: ", name, " must be a CPU tensor");
    LF_CHECK_ARG(t->dim() == 1 && t->size(0) == B, "sample: ", name, " must have shape (B=", B, ",), got ",
                 shape_str(*t));
  }
  if (seen) {
    const auto& s = *seen;
    LF_CHECK_TYPE(s.scalar_type() == torch::kInt32 || s.scalar_type() == torch::kInt64,
                  "sample: seen must be int32 or int64 token counts, got ", s.scalar_type());
    LF_CHECK_ARG(s.device() == logits.device(), "sample: seen is on ", s.device(), ", logits on ", logits.device());
    LF_CHECK_ARG(s.dim() == 2 && s.size(0) == B && s.size(1) == V, "sample: seen must have shape (B=", B, ", V=", V,
                 "), got ", shape_str(s));
  }
  const auto P = params.contiguous();
  const auto S = seeds.contiguous(), T = steps.contiguous();
  const double* pp = P.data_ptr<double>();
  const int64_t* sp = S.data_ptr<int64_t>();
  const int64_t* tp = T.data_ptr<int64_t>();
  std::vector<SampleParams> out(B);
  for (int64_t b = 0; b < B; ++b) {
    const double* r = pp + b * kNumParams;
    const double temp = r[0], top_k = r[1], top_p = r[2], min_p = r[3], rep = r[4], pres = r[5], freq = r[6];
    LF_CHECK_ARG(std::isfinite(temp) && temp >= 0, "sample: row ", b, ": temperature must be finite and >= 0, got ", temp);
    LF_CHECK_ARG(std::isfinite(top_k) && top_k >= 0 && top_k == std::floor(top_k) && top_k < 9.0e18,
                 "sample: row ", b, ": top_k must be an integer >= 0, got ", top_k);
    LF_CHECK_ARG(top_p > 0 && top_p <= 1, "sample: row ", b, ": top_p must be in (0, 1], got ", top_p);
    LF_CHECK_ARG(min_p >= 0 && min_p <= 1, "sample: row ", b, ": min_p must be in [0, 1], got ", min_p);
    LF_CHECK_ARG(std::isfinite(rep) && rep > 0, "sample: row ", b, ": repetition_penalty must be finite and > 0, got ", rep);
    LF_CHECK_ARG(std::isfinite(pres) && std::isfinite(freq), "sample: row ", b, ": presence/frequency penalties must be finite");
    LF_CHECK_ARG(sp[b] >= 0, "sample: row ", b, ": seed must be >= 0, got ", sp[b]);
    LF_CHECK_ARG(tp[b] >= 0, "sample: row ", b, ": step must be >= 0, got ", tp[b]);
    SampleParams& q = out[b];
    q.temperature = static_cast<float>(temp);
    // A temperature that rounds to 0 in fp32 is greedy; one whose reciprocal overflows is not representable.
    LF_CHECK_ARG(temp == 0 || (q.temperature > 0 && std::isfinite(1.0f / q.temperature)),
                 "sample: row ", b, ": temperature ", temp, " is too small for fp32 (use 0 for greedy)");
    q.top_k = top_k >= static_cast<double>(V) ? 0 : static_cast<int64_t>(top_k);  // >= V keeps everything
    q.top_p = static_cast<float>(top_p);
    q.min_p = static_cast<float>(min_p);
    q.repetition_penalty = static_cast<float>(rep);
    LF_CHECK_ARG(q.repetition_penalty > 0 && std::isfinite(q.repetition_penalty), "sample: row ", b,
                 ": repetition_penalty ", rep, " is not representable in fp32");
    q.presence_penalty = static_cast<float>(pres);
    q.frequency_penalty = static_cast<float>(freq);
    LF_CHECK_ARG(std::isfinite(q.presence_penalty) && std::isfinite(q.frequency_penalty), "sample: row ", b,
                 ": penalties are not representable in fp32");
    q.seed = static_cast<uint64_t>(sp[b]);
    q.step = static_cast<uint64_t>(tp[b]);
  }
  return out;
}

std::string rows_str(const std::vector<int64_t>& rows) {
  std::string s = "[";
  for (size_t i = 0; i < rows.size() && i < 16; ++i) s += (i ? ", " : "") + std::to_string(rows[i]);
  if (rows.size() > 16) s += ", ...";
  return s + "]";
}

template <typename Count>
void penalise(float* x, const torch::Tensor& seen_c, int64_t offset, int64_t V, const SampleParams& p) {
  apply_penalties_row<Count>(x, seen_c.data_ptr<Count>() + offset, V, p);
}

}  // namespace

std::tuple<torch::Tensor, std::optional<torch::Tensor>> sample(const torch::Tensor& logits,
                                                               const torch::Tensor& params,
                                                               const torch::Tensor& seeds,
                                                               const torch::Tensor& steps,
                                                               const std::optional<torch::Tensor>& seen,
                                                               bool return_logprobs) {
  const std::vector<SampleParams> rows = check_sample_args(logits, params, seeds, steps, seen);
  if (logits.is_cuda()) {
#ifdef LLAMA_FAST_WITH_CUDA
    return sample_cuda(logits, rows.data(), static_cast<int64_t>(rows.size() * sizeof(SampleParams)), seen,
                       return_logprobs);
#else
    LF_CHECK_ARG(false, "sample: llama_fast._C was built without CUDA; logits are on ", logits.device());
#endif
  }
  const int64_t B = logits.size(0), V = logits.size(1);
  const LogitType type = logit_type(logits);
  // Rows may be strided (a slice of (B, T, V) logits, an expanded row): only the columns must be dense.
  const auto L = logits.stride(1) == 1 || V == 1 ? logits : logits.contiguous();
  const int64_t row_stride = logits.stride(1) == 1 || V == 1 ? logits.stride(0) : V;
  std::optional<torch::Tensor> seen_c;
  int64_t seen_stride = V;
  if (seen) {
    seen_c = seen->stride(1) == 1 || V == 1 ? *seen : seen->contiguous();
    seen_stride = seen->stride(1) == 1 || V == 1 ? seen->stride(0) : V;
  }
  auto tokens = torch::empty({B}, torch::kInt64);
  std::optional<torch::Tensor> logprobs;
  if (return_logprobs) logprobs = torch::empty({B}, torch::kFloat32);
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* lp = return_logprobs ? logprobs->data_ptr<float>() : nullptr;
  const char* base = static_cast<const char*>(L.data_ptr());
  const int64_t row_bytes = row_stride * static_cast<int64_t>(L.element_size());
  std::vector<uint8_t> bad(B, 0);
  const int threads = static_cast<int>(std::min<int64_t>(B, omp_get_max_threads()));
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
  {
    SampleWorkspace ws;
    ws.resize(V);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      const SampleParams& p = rows[b];
      float* x = ws.x.data();
      load_row(base + b * row_bytes, type, V, x);
      if (!all_finite(x, V)) {
        bad[b] = 1;
        tok[b] = -1;
        if (lp) lp[b] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      if (seen_c && p.has_penalties()) {
        if (seen_c->scalar_type() == torch::kInt32) penalise<int32_t>(x, *seen_c, b * seen_stride, V, p);
        else penalise<int64_t>(x, *seen_c, b * seen_stride, V, p);
      }
      tok[b] = sample_filtered_row(ws, V, p);
      if (lp) {
        load_row(base + b * row_bytes, type, V, ws.e.data());
        lp[b] = raw_logprob(ws.e.data(), V, tok[b]);
      }
    }
  }
  std::vector<int64_t> bad_rows;
  for (int64_t b = 0; b < B; ++b)
    if (bad[b]) bad_rows.push_back(b);
  LF_CHECK_ARG(bad_rows.empty(), "sample: logits contain NaN or inf in rows ", rows_str(bad_rows));
  return {tokens, logprobs};
}

torch::Tensor apply_penalties(const torch::Tensor& logits, const torch::Tensor& seen, const torch::Tensor& params) {
  LF_CHECK_ARG(logits.dim() == 2, "apply_penalties: logits must have shape (B, V), got ", shape_str(logits));
  LF_CHECK_ARG(logits.is_cpu(), "apply_penalties: logits must be a CPU tensor");
  const int64_t B = logits.size(0);
  auto seeds = torch::zeros({B}, torch::kInt64);
  const std::vector<SampleParams> rows = check_sample_args(logits, params, seeds, seeds, seen);
  const int64_t V = logits.size(1);
  auto out = logits.to(torch::kFloat32).contiguous().clone();
  const auto seen_c = seen.contiguous();
  for (int64_t b = 0; b < B; ++b) {
    float* x = out.data_ptr<float>() + b * V;
    if (seen_c.scalar_type() == torch::kInt32) penalise<int32_t>(x, seen_c, b * V, V, rows[b]);
    else penalise<int64_t>(x, seen_c, b * V, V, rows[b]);
  }
  return out;
}

}  // namespace llama_fast
