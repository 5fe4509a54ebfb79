// Host side of the CPU kernels as torch ops (attention over a contiguous cache, matrix products with float or
// GGUF quantized weights): every
// input is checked here with TORCH_CHECK, so bad input is a Python exception, never a crash. The work is
// in cpu_decode.h / cpu_decode_isa.inc, the kernels the decode session (session.h) runs.
#include "decode_cpu.h"

#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

namespace llama_fast {

namespace cd = cpu_decode;

namespace {

bool is_weight_dtype(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16;
}

cd::Isa parse_isa(const std::string& name) {
  std::string error;
  const cd::Isa isa = cd::parse_isa(name, error);
  TORCH_CHECK(error.empty(), error);
  return isa;
}

// The threads an op runs on: num_threads, or torch's count for 0.
int thread_count(int64_t num_threads, const char* who) {
  TORCH_CHECK(num_threads >= 0 && num_threads <= cd::kMaxThreads, who, ": num_threads must be in [0, ",
              cd::kMaxThreads, "] (0: torch's thread count), got ", num_threads);
  return num_threads > 0 ? static_cast<int>(num_threads) : at::get_num_threads();
}

// fp32 contiguous copy of an optional per-head tensor (alibi slopes (H,), bucket table (H, max_distance + 1)),
// checked; undefined when absent. `who` names the caller in errors.
torch::Tensor span_table(const std::optional<torch::Tensor>& t, int64_t n_heads, bool per_distance, const char* who,
                         const char* name) {
  if (!t.has_value() || !t->defined()) return {};
  const auto& x = *t;
  TORCH_CHECK(x.device().is_cpu() && x.is_floating_point(), who, ": ", name, " must be a floating-point CPU tensor");
  if (per_distance) {
    TORCH_CHECK(x.dim() == 2 && x.size(0) == n_heads && x.size(1) >= 1 && x.size(1) < (int64_t{1} << 30), who, ": ",
                name, " must be (n_heads=", n_heads, ", max_distance + 1), got ", x.sizes());
  } else {
    TORCH_CHECK(x.dim() == 1 && x.size(0) == n_heads, who, ": ", name, " must have shape (", n_heads, "), got ",
                x.sizes());
  }
  return x.to(torch::kFloat32).contiguous().clone();
}

// One HeadSpan per query head (docs/ARCHITECTURE.md section 3); slopes and buckets must outlive the result.
std::vector<cd::HeadSpan> head_spans(int64_t n_heads, const torch::Tensor& slopes, const torch::Tensor& buckets,
                                     int64_t window, int64_t sink_tokens, double logit_softcap, double scale,
                                     const char* who) {
  TORCH_CHECK(window >= 0 && sink_tokens >= 0, who, ": window and sink_tokens must be >= 0");
  TORCH_CHECK(sink_tokens == 0 || (window > 0 && sink_tokens < window), who, ": sink_tokens needs a window larger than it");
  TORCH_CHECK(logit_softcap >= 0 && std::isfinite(logit_softcap), who, ": logit_softcap must be >= 0 (0: off)");
  TORCH_CHECK(scale > 0 && std::isfinite(scale), who, ": scale must be positive");
  TORCH_CHECK(window < (int64_t{1} << 30), who, ": window too large");
  const int64_t max_distance = buckets.defined() ? buckets.size(1) - 1 : 0;
  std::vector<cd::HeadSpan> spans(n_heads);
  for (int64_t h = 0; h < n_heads; ++h) {
    auto& sp = spans[h];
    sp.has_alibi = slopes.defined();
    sp.slope = slopes.defined() ? slopes.data_ptr<float>()[h] : 0.0f;
    sp.buckets = buckets.defined() ? buckets.data_ptr<float>() + h * (max_distance + 1) : nullptr;
    sp.max_distance = static_cast<int>(max_distance);
    sp.window = static_cast<int>(window);
    sp.sinks = static_cast<int>(sink_tokens);
    sp.softcap = static_cast<float>(logit_softcap);
    sp.scale = static_cast<float>(scale);
  }
  return spans;
}

}  // namespace

void check_cpu_tensor(const torch::Tensor& t, const char* who, const std::string& name) {
  TORCH_CHECK(t.defined(), who, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), who, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), who, ": ", name, " must be contiguous");
}

void check_cpu_fp32(const torch::Tensor& t, const char* who, const std::string& name) {
  check_cpu_tensor(t, who, name);
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, who, ": ", name, " must be a contiguous float32 CPU tensor, got ",
              t.scalar_type());
}

torch::Tensor cpu_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                            const torch::Tensor& seqlens, const std::optional<torch::Tensor>& alibi_slopes,
                            const std::optional<torch::Tensor>& bucket_table, int64_t window, int64_t sink_tokens,
                            double logit_softcap, double scale, const std::optional<torch::Tensor>& q_sink,
                            const std::optional<torch::Tensor>& block_table, int64_t num_threads,
                            const std::string& isa) {
  const char* who = "cpu_attention";
  check_cpu_tensor(q, who, "q");
  check_cpu_tensor(k_cache, who, "k_cache");
  check_cpu_tensor(v_cache, who, "v_cache");
  check_cpu_tensor(seqlens, who, "seqlens");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.dim() == 4 && q.size(0) >= 1 && q.size(1) >= 1,
              who, ": q must be float32 (B, T, H, D), got ", q.scalar_type(), " ", q.sizes());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  const bool paged = block_table.has_value();
  TORCH_CHECK(is_weight_dtype(k_cache) && k_cache.dim() == 4 && (paged || k_cache.size(0) == B) && k_cache.size(3) == D,
              who, ": k_cache must be float32 or bfloat16 ", paged ? "(num_blocks, block_size" : "(B=", paged ? "" : std::to_string(B),
              paged ? "" : ", S_max", ", Hkv, D=", D, "), got ", k_cache.scalar_type(), " ", k_cache.sizes());
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() && v_cache.sizes() == k_cache.sizes(), who,
              ": v_cache must match k_cache (", k_cache.scalar_type(), " ", k_cache.sizes(), "), got ",
              v_cache.scalar_type(), " ", v_cache.sizes());
  const int64_t Hkv = k_cache.size(2);
  // A row's keys: one block of S positions (contiguous), or the blocks its row of block_table names.
  int64_t S = k_cache.size(1), block_size = S, max_blocks = 1;
  if (paged) {
    check_cpu_tensor(*block_table, who, "block_table");
    TORCH_CHECK(block_table->scalar_type() == torch::kInt32 && block_table->dim() == 2 && block_table->size(0) == B &&
                    block_table->size(1) >= 1, who, ": block_table must be int32 (B=", B, ", max_blocks), got ",
                block_table->scalar_type(), " ", block_table->sizes());
    max_blocks = block_table->size(1);
    S = max_blocks * block_size;
  }
  TORCH_CHECK(Hkv >= 1 && H >= 1 && H % Hkv == 0, who, ": the query heads (", H, ") must be a multiple of the KV heads (", Hkv, ")");
  TORCH_CHECK(std::max({S, H * D, B * T}) < (int64_t{1} << 30), who, ": sizes too large");
  TORCH_CHECK(seqlens.scalar_type() == torch::kInt32 && seqlens.dim() == 1 && seqlens.size(0) == B, who,
              ": seqlens must be int32 of shape (", B, ",), got ", seqlens.scalar_type(), " ", seqlens.sizes());
  if (q_sink) {
    check_cpu_tensor(*q_sink, who, "q_sink");
    TORCH_CHECK(q_sink->scalar_type() == torch::kFloat32 && q_sink->sizes() == q.sizes(), who,
                ": q_sink must be float32 shaped like q ", q.sizes(), ", got ", q_sink->scalar_type(), " ",
                q_sink->sizes());
  }
  const int32_t* len = seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(len[b] >= T && len[b] <= S, who, ": seqlens[", b, "] = ", len[b], " must count the ", T,
                " new queries and fit the cache (", S, " positions)");
  const int32_t* tables = paged ? block_table->data_ptr<int32_t>() : nullptr;
  for (int64_t b = 0; paged && b < B; ++b)
    for (int64_t i = 0; i < (len[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(tables[b * max_blocks + i] >= 0 && tables[b * max_blocks + i] < k_cache.size(0), who,
                  ": block_table[", b, ", ", i, "] = ", tables[b * max_blocks + i], " is outside the pool of ",
                  k_cache.size(0), " blocks");
  const auto slopes = span_table(alibi_slopes, H, false, who, "alibi_slopes");
  const auto buckets = span_table(bucket_table, H, true, who, "bucket_table");
  const auto spans = head_spans(H, slopes, buckets, window, sink_tokens, logit_softcap, scale, who);
  const auto kern = cd::kernels_for(parse_isa(isa));
  const int nt = thread_count(num_threads, who);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* qsp = q_sink ? q_sink->data_ptr<float>() : qp;
  float* op = out.data_ptr<float>();
  const char* kp = static_cast<const char*>(k_cache.data_ptr());
  const char* vp = static_cast<const char*>(v_cache.data_ptr());
  const bool bf16 = k_cache.scalar_type() == torch::kBFloat16;
  const size_t esz = bf16 ? 2 : 4, block = static_cast<size_t>(block_size) * Hkv * D;  // elements per block
  // A unit: one query's heads of one KV group (in parts of at most kMaxGroupHeads), sharing one read of the
  // group's cache.
  const int64_t group = H / Hkv, parts = (group + cd::kMaxGroupHeads - 1) / cd::kMaxGroupHeads;
  const int64_t per_part = (group + parts - 1) / parts, units = B * T * Hkv * parts;
  pybind11::gil_scoped_release no_gil;
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> scores(cd::attention_scratch(static_cast<int>(per_part), static_cast<int>(S)));
    // Query t of row b sits at position len[b] - T + t; later queries see more keys, so the units are dealt
    // out in small chunks to keep the threads even.
#pragma omp for schedule(dynamic, 4)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t bt = u / (Hkv * parts), kh = u / parts % Hkv, h = kh * group + u % parts * per_part, b = bt / T;
      const int64_t nh = std::min(per_part, (kh + 1) * group - h);
      const int32_t own_block = static_cast<int32_t>(b);  // contiguous: row b is block b of the cache
      const int32_t* table = paged ? tables + b * max_blocks : &own_block;
      const size_t offset = kh * D * esz;
      const int pos = static_cast<int>(len[b] - T + bt % T);
      kern.attend_paged(qp + (bt * H + h) * D, qsp + (bt * H + h) * D, kp + offset, vp + offset, bf16, table,
                        static_cast<int>(block_size), block, Hkv * D, static_cast<int>(D), pos,
                        static_cast<int>(cd::sink_position(pos, static_cast<int>(window), static_cast<int>(sink_tokens))),
                        static_cast<int>(nh), spans.data() + h, scores.data(), op + (bt * H + h) * D);
    }
  }
  return out;
}

namespace {

// The weight type called `name`, checked (`who` names the op in the message).
cd::WType parse_wtype(const std::string& name, const char* who) {
  cd::WType t;
  TORCH_CHECK(cd::parse_wtype(name, t), who, ": unknown wtype '", name, "' (", cd::wtype_names(), ")");
  return t;
}

// Checks K against a quantized type's block and raw (uint8 (N, bytes)) against rows of K elements of it.
void check_raw(const torch::Tensor& raw, cd::WType t, int64_t K, const char* who) {
  check_cpu_tensor(raw, who, "the weight");
  const int block = cd::block_size(t);
  TORCH_CHECK(K >= 1 && K % block == 0 && K < (int64_t{1} << 31), who, ": ", cd::wtype_name(t), " rows hold whole blocks of ",
              block, " values, got K = ", K);
  TORCH_CHECK(raw.scalar_type() == torch::kUInt8 && raw.dim() == 2 && raw.size(1) == cd::row_bytes(t, K) &&
                  raw.size(0) < (int64_t{1} << 31),
              who, ": a ", cd::wtype_name(t), " weight of K = ", K, " is uint8 (N, ", cd::row_bytes(t, K),
              ") (its raw blocks), got ", raw.scalar_type(), " ", raw.sizes());
}

}  // namespace

torch::Tensor cpu_matvec(const torch::Tensor& weight, const torch::Tensor& x, int64_t num_threads,
                         const std::string& isa, const std::string& wtype) {
  const char* who = "cpu_matvec";
  check_cpu_tensor(weight, who, "weight");
  check_cpu_tensor(x, who, "x");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.size(0) >= 1 && x.size(0) < (int64_t{1} << 31),
              who, ": x must be float32 (B, K), got ", x.scalar_type(), " ", x.sizes());
  const cd::WType dtype = weight.scalar_type() == torch::kBFloat16 ? cd::WType::BF16 : cd::WType::F32;
  const cd::WType t = wtype.empty() ? dtype : parse_wtype(wtype, who);
  if (cd::is_quantized(t)) {
    check_raw(weight, t, x.size(1), who);
  } else {
    TORCH_CHECK(is_weight_dtype(weight) && weight.dim() == 2, who, ": weight must be (N, K) float32 or bfloat16, got ",
                weight.scalar_type(), " ", weight.sizes());
    TORCH_CHECK(t == dtype, who, ": wtype '", wtype, "' but the weight is ", weight.scalar_type());
    TORCH_CHECK(x.size(1) == weight.size(1), who, ": x must be float32 (B, ", weight.size(1), "), got ", x.sizes());
    TORCH_CHECK(weight.size(0) < (int64_t{1} << 31) && weight.size(1) < (int64_t{1} << 31), who, ": sizes too large");
  }
  const auto kern = cd::kernels_for(parse_isa(isa));
  const int N = static_cast<int>(weight.size(0)), K = static_cast<int>(x.size(1)), B = static_cast<int>(x.size(0));
  auto y = torch::empty({B, N}, torch::kFloat32);
  const void* w = weight.data_ptr();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int nt = thread_count(num_threads, who);
  pybind11::gil_scoped_release no_gil;
#pragma omp parallel num_threads(nt)
  {
    int lo, hi;
    cd::split(N, 16, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
    kern.dot_rows(w, t, K, lo, hi, xp, K, B, yp, N);
  }
  return y;
}

torch::Tensor cpu_dequantize(const torch::Tensor& raw, const std::string& wtype, int64_t K) {
  const char* who = "cpu_dequantize";
  const cd::WType t = parse_wtype(wtype, who);
  check_raw(raw, t, K, who);
  auto out = torch::empty({raw.size(0), K}, torch::kFloat32);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  const int64_t rb = raw.size(1);
  at::parallel_for(0, raw.size(0), 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) cd::dequantize_row(t, src + r * rb, static_cast<int>(K), dst + r * K);
  });
  return out;
}

torch::Tensor cpu_quantize_activations(const torch::Tensor& x, const std::string& wtype, const std::string& isa) {
  const char* who = "cpu_quantize_activations";
  check_cpu_fp32(x, who, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) < (int64_t{1} << 31), who, ": x must be (B, K), got ", x.sizes());
  const cd::WType t = parse_wtype(wtype, who);
  const int64_t K = x.size(1);
  TORCH_CHECK(cd::is_quantized(t), who, ": wtype must be a quantized type, got ", wtype);
  TORCH_CHECK(K >= 1 && K % cd::block_size(t) == 0, who, ": ", cd::wtype_name(t), " rows hold whole blocks of ",
              cd::block_size(t), " values, got K = ", K);
  const auto kern = cd::kernels_for(parse_isa(isa));
  const cd::ActSpec spec = kern.act_spec(t);
  auto out = torch::empty_like(x);
  std::vector<uint8_t> pack(cd::act_bytes(spec, static_cast<int>(K)));
  for (int64_t b = 0; b < x.size(0); ++b) {
    kern.quantize_activations(t, x.data_ptr<float>() + b * K, static_cast<int>(K), pack.data());
    cd::dequantize_activations(spec, pack.data(), static_cast<int>(K), out.data_ptr<float>() + b * K);
  }
  return out;
}

}  // namespace llama_fast
