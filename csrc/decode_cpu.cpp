// Host side of the CPU decode step: CpuDecoder holds (references to) a model's weights, checked once, and
// runs one decode step per call on a StaticKVCache's tensors. Every input is checked here with TORCH_CHECK,
// so bad input is a Python exception, never a crash. The work is in cpu_decode.h.
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
  TORCH_CHECK(error.empty(), "CpuDecoder: ", error);
  return isa;
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

torch::Tensor CpuDecoder::weight(const torch::Tensor& t, int64_t rows, int64_t cols, const std::string& name) {
  check_cpu_tensor(t, "CpuDecoder", name);
  TORCH_CHECK(is_weight_dtype(t), "CpuDecoder: ", name, " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == wdtype_, "CpuDecoder: ", name, " is ", t.scalar_type(), ", the embedding is ", wdtype_,
              " (all matrices must share one dtype)");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "CpuDecoder: ", name, " must have shape (",
              rows, ", ", cols, "), got ", t.sizes());
  keep_.push_back(t);
  return t;
}

torch::Tensor CpuDecoder::vector(const torch::Tensor& t, int64_t n, const std::string& name) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), "CpuDecoder: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_floating_point(), "CpuDecoder: ", name, " must be floating point, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "CpuDecoder: ", name, " must have shape (", n, "), got ", t.sizes());
  auto f = t.to(torch::kFloat32).contiguous().clone();
  keep_.push_back(f);
  return f;
}

CpuDecoder::CpuDecoder(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps, torch::Tensor embedding,
                       torch::Tensor output, torch::Tensor final_norm, std::vector<torch::Tensor> attn_norm,
                       std::vector<torch::Tensor> wq, std::vector<torch::Tensor> wk, std::vector<torch::Tensor> wv,
                       std::vector<torch::Tensor> wo, std::vector<torch::Tensor> ffn_norm,
                       std::vector<torch::Tensor> w1, std::vector<torch::Tensor> w2, std::vector<torch::Tensor> w3,
                       torch::Tensor rope_table, std::optional<torch::Tensor> alibi_slopes,
                       std::optional<torch::Tensor> bucket_table, int64_t window, int64_t sink_tokens,
                       double logit_softcap, double scale, int64_t num_threads, const std::string& isa) {
  isa_ = parse_isa(isa);
  check_cpu_tensor(embedding, "CpuDecoder", "embedding");
  TORCH_CHECK(is_weight_dtype(embedding), "CpuDecoder: embedding must be float32 or bfloat16, got ",
              embedding.scalar_type());
  TORCH_CHECK(embedding.dim() == 2, "CpuDecoder: embedding must be (vocab, dim), got ", embedding.sizes());
  wdtype_ = embedding.scalar_type();
  const int64_t vocab = embedding.size(0), dim = embedding.size(1);
  const int64_t n_layers = static_cast<int64_t>(wq.size());
  TORCH_CHECK(n_layers >= 1, "CpuDecoder: needs at least one layer");
  for (const auto* list : {&attn_norm, &wk, &wv, &wo, &ffn_norm, &w1, &w2, &w3})
    TORCH_CHECK(static_cast<int64_t>(list->size()) == n_layers, "CpuDecoder: every per-layer list needs ", n_layers,
                " tensors, one has ", list->size());
  TORCH_CHECK(n_heads >= 1 && n_kv_heads >= 1 && n_heads % n_kv_heads == 0,
              "CpuDecoder: n_heads must be a positive multiple of n_kv_heads, got ", n_heads, " and ", n_kv_heads);
  TORCH_CHECK(head_dim >= 2 && head_dim % 2 == 0, "CpuDecoder: head_dim must be even, got ", head_dim);
  TORCH_CHECK(w1[0].dim() == 2, "CpuDecoder: w1 must be 2-d");
  const int64_t ffn = w1[0].size(0);
  TORCH_CHECK(std::max({vocab, dim, ffn, n_heads * head_dim}) < (int64_t{1} << 30), "CpuDecoder: sizes too large");
  keep_.push_back(embedding);
  weight(output, vocab, dim, "output");
  const auto fnorm = vector(final_norm, dim, "norm");
  layers_.resize(n_layers);
  for (int64_t l = 0; l < n_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    auto& L = layers_[l];
    L.wq = weight(wq[l], n_heads * head_dim, dim, p + "wq").data_ptr();
    L.wk = weight(wk[l], n_kv_heads * head_dim, dim, p + "wk").data_ptr();
    L.wv = weight(wv[l], n_kv_heads * head_dim, dim, p + "wv").data_ptr();
    L.wo = weight(wo[l], dim, n_heads * head_dim, p + "wo").data_ptr();
    L.w1 = weight(w1[l], ffn, dim, p + "w1").data_ptr();
    L.w2 = weight(w2[l], dim, ffn, p + "w2").data_ptr();
    L.w3 = weight(w3[l], ffn, dim, p + "w3").data_ptr();
    L.attn_norm = vector(attn_norm[l], dim, p + "attention_norm").data_ptr<float>();
    L.ffn_norm = vector(ffn_norm[l], dim, p + "ffn_norm").data_ptr<float>();
  }
  // Span bias, one HeadSpan per query head.
  const auto slopes = span_table(alibi_slopes, n_heads, false, "CpuDecoder", "alibi_slopes");
  const auto buckets = span_table(bucket_table, n_heads, true, "CpuDecoder", "bucket_table");
  keep_.push_back(slopes);
  keep_.push_back(buckets);
  span_ = head_spans(n_heads, slopes, buckets, window, sink_tokens, logit_softcap, scale, "CpuDecoder");
  desc_.dim = static_cast<int>(dim);
  desc_.n_layers = static_cast<int>(n_layers);
  desc_.n_heads = static_cast<int>(n_heads);
  desc_.n_kv_heads = static_cast<int>(n_kv_heads);
  desc_.head_dim = static_cast<int>(head_dim);
  desc_.ffn_dim = static_cast<int>(ffn);
  desc_.vocab = static_cast<int>(vocab);
  desc_.eps = static_cast<float>(eps);
  desc_.w_bf16 = wdtype_ == torch::kBFloat16;
  desc_.embedding = embedding.data_ptr();
  desc_.output = output.data_ptr();
  desc_.final_norm = fnorm.data_ptr<float>();
  desc_.layers = layers_.data();
  desc_.span = span_.data();
  set_rope_table(rope_table);
  TORCH_CHECK(num_threads >= 0, "CpuDecoder: num_threads must be >= 0 (0: torch's thread count)");
  num_threads_ = num_threads > 0 ? static_cast<int>(num_threads) : at::get_num_threads();
}

void CpuDecoder::set_rope_table(torch::Tensor table) {
  check_cpu_fp32(table, "CpuDecoder", "rope_table");
  TORCH_CHECK(table.dim() == 2 && table.size(1) % 2 == 0 && table.size(1) >= 2 && table.size(1) <= desc_.head_dim,
              "CpuDecoder: rope_table must be (positions, rot_dim) with an even rot_dim <= head_dim (",
              desc_.head_dim, "), got ", table.sizes());
  TORCH_CHECK(table.size(0) < (int64_t{1} << 30), "CpuDecoder: rope_table too long");
  rope_ = table;
  desc_.rope = rope_.data_ptr<float>();
  desc_.rope_rows = static_cast<int>(table.size(0));
  desc_.rot_dim = static_cast<int>(table.size(1));
}

torch::Tensor CpuDecoder::step(const torch::Tensor& tokens, const torch::Tensor& seqlens,
                               const std::vector<torch::Tensor>& k_cache, const std::vector<torch::Tensor>& v_cache) {
  check_cpu_tensor(tokens, "CpuDecoder.step", "tokens");
  check_cpu_tensor(seqlens, "CpuDecoder.step", "seqlens");
  TORCH_CHECK(tokens.scalar_type() == torch::kInt64 && tokens.dim() == 1 && tokens.size(0) >= 1,
              "CpuDecoder.step: tokens must be int64 of shape (B,), got ", tokens.scalar_type(), " ", tokens.sizes());
  const int64_t B = tokens.size(0);
  TORCH_CHECK(seqlens.scalar_type() == torch::kInt32 && seqlens.dim() == 1 && seqlens.size(0) == B,
              "CpuDecoder.step: seqlens must be int32 of shape (", B, ",), got ", seqlens.scalar_type(), " ",
              seqlens.sizes());
  const int L = desc_.n_layers;
  TORCH_CHECK(static_cast<int>(k_cache.size()) == L && static_cast<int>(v_cache.size()) == L,
              "CpuDecoder.step: need one K and one V cache tensor per layer (", L, "), got ", k_cache.size(), " and ",
              v_cache.size());
  const auto kv_dtype = k_cache[0].scalar_type();
  TORCH_CHECK(kv_dtype == torch::kFloat32 || kv_dtype == torch::kBFloat16,
              "CpuDecoder.step: the KV cache must be float32 or bfloat16, got ", kv_dtype);
  TORCH_CHECK(k_cache[0].dim() == 4, "CpuDecoder.step: KV cache tensors must be (B, S_max, n_kv_heads, head_dim), got ",
              k_cache[0].sizes());
  const int64_t s_max = k_cache[0].size(1);
  std::vector<void*> kptr(L), vptr(L);
  for (int l = 0; l < L; ++l) {
    for (int which = 0; which < 2; ++which) {
      const auto& c = which == 0 ? k_cache[l] : v_cache[l];
      const char* name = which == 0 ? "k" : "v";
      TORCH_CHECK(c.defined() && c.device().is_cpu() && c.is_contiguous(), "CpuDecoder.step: cache ", name, "[", l,
                  "] must be a contiguous CPU tensor");
      TORCH_CHECK(c.scalar_type() == kv_dtype, "CpuDecoder.step: cache ", name, "[", l, "] is ", c.scalar_type(),
                  ", expected ", kv_dtype);
      TORCH_CHECK(c.dim() == 4 && c.size(0) == B && c.size(1) == s_max && c.size(2) == desc_.n_kv_heads &&
                      c.size(3) == desc_.head_dim,
                  "CpuDecoder.step: cache ", name, "[", l, "] must have shape (", B, ", ", s_max, ", ",
                  desc_.n_kv_heads, ", ", desc_.head_dim, "), got ", c.sizes());
      (which == 0 ? kptr : vptr)[l] = c.data_ptr();
    }
  }
  TORCH_CHECK(s_max < (int64_t{1} << 30), "CpuDecoder.step: cache too long");
  const int64_t* tok = tokens.data_ptr<int64_t>();
  int32_t* pos = seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(tok[b] >= 0 && tok[b] < desc_.vocab, "CpuDecoder.step: token id ", tok[b], " of row ", b,
                " is outside [0, ", desc_.vocab, ")");
    TORCH_CHECK(pos[b] >= 0, "CpuDecoder.step: seqlens[", b, "] is negative (", pos[b], ")");
    TORCH_CHECK(pos[b] < s_max, "llama_fast: KV cache full: row ", b, " holds ", pos[b], " of ", s_max,
                " tokens, no room for one more");
    TORCH_CHECK(pos[b] < desc_.rope_rows, "CpuDecoder.step: position ", pos[b], " is beyond the RoPE table (",
                desc_.rope_rows, " positions); call set_rope_table with a longer one");
  }
  auto logits = torch::empty({B, desc_.vocab}, torch::kFloat32);
  {
    pybind11::gil_scoped_release no_gil;
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t need = cd::workspace_floats(desc_, static_cast<int>(B), static_cast<int>(s_max), num_threads_);
    if (workspace_.size() < need) workspace_.assign(need, 0.0f);
    cd::StepDesc s;
    s.batch = static_cast<int>(B);
    s.tokens = tok;
    s.positions = pos;
    s.s_max = static_cast<int>(s_max);
    s.kv_bf16 = kv_dtype == torch::kBFloat16;
    s.k_cache = kptr.data();
    s.v_cache = vptr.data();
    s.logits = logits.data_ptr<float>();
    s.num_threads = num_threads_;
    s.workspace = workspace_.data();
    cd::decode_step(desc_, s, isa_);
    for (int64_t b = 0; b < B; ++b) pos[b] += 1;  // the new tokens are committed: the cache's end_step
  }
  return logits;
}

std::string CpuDecoder::isa() const { return cd::isa_name(isa_); }

torch::Tensor cpu_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                            const torch::Tensor& seqlens, const std::optional<torch::Tensor>& alibi_slopes,
                            const std::optional<torch::Tensor>& bucket_table, int64_t window, int64_t sink_tokens,
                            double logit_softcap, double scale, int64_t num_threads, const std::string& isa) {
  const char* who = "cpu_attention";
  check_cpu_tensor(q, who, "q");
  check_cpu_tensor(k_cache, who, "k_cache");
  check_cpu_tensor(v_cache, who, "v_cache");
  check_cpu_tensor(seqlens, who, "seqlens");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.dim() == 4 && q.size(0) >= 1 && q.size(1) >= 1,
              who, ": q must be float32 (B, T, H, D), got ", q.scalar_type(), " ", q.sizes());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(is_weight_dtype(k_cache) && k_cache.dim() == 4 && k_cache.size(0) == B && k_cache.size(3) == D,
              who, ": k_cache must be float32 or bfloat16 (B=", B, ", S_max, Hkv, D=", D, "), got ",
              k_cache.scalar_type(), " ", k_cache.sizes());
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() && v_cache.sizes() == k_cache.sizes(), who,
              ": v_cache must match k_cache (", k_cache.scalar_type(), " ", k_cache.sizes(), "), got ",
              v_cache.scalar_type(), " ", v_cache.sizes());
  const int64_t S = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, who, ": the query heads (", H, ") must be a multiple of the KV heads (", Hkv, ")");
  TORCH_CHECK(std::max({S, H * D, B * T}) < (int64_t{1} << 30), who, ": sizes too large");
  TORCH_CHECK(seqlens.scalar_type() == torch::kInt32 && seqlens.dim() == 1 && seqlens.size(0) == B, who,
              ": seqlens must be int32 of shape (", B, ",), got ", seqlens.scalar_type(), " ", seqlens.sizes());
  const int32_t* len = seqlens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(len[b] >= T && len[b] <= S, who, ": seqlens[", b, "] = ", len[b], " must count the ", T,
                " new queries and fit the cache (", S, " positions)");
  const auto slopes = span_table(alibi_slopes, H, false, who, "alibi_slopes");
  const auto buckets = span_table(bucket_table, H, true, who, "bucket_table");
  const auto spans = head_spans(H, slopes, buckets, window, sink_tokens, logit_softcap, scale, who);
  const auto kern = cd::kernels_for(parse_isa(isa));
  TORCH_CHECK(num_threads >= 0, who, ": num_threads must be >= 0 (0: torch's thread count)");
  const int nt = num_threads > 0 ? static_cast<int>(num_threads) : at::get_num_threads();
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const char* kp = static_cast<const char*>(k_cache.data_ptr());
  const char* vp = static_cast<const char*>(v_cache.data_ptr());
  const bool bf16 = k_cache.scalar_type() == torch::kBFloat16;
  const size_t esz = bf16 ? 2 : 4, row = static_cast<size_t>(S) * Hkv * D;  // cache elements per batch row
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
      const int64_t bt = u / (Hkv * parts), kh = u / parts % Hkv, h = kh * group + u % parts * per_part;
      const int64_t nh = std::min(per_part, (kh + 1) * group - h);
      const size_t offset = (bt / T * row + kh * D) * esz;
      kern.attend(qp + (bt * H + h) * D, kp + offset, vp + offset, bf16, Hkv * D, static_cast<int>(D),
                  static_cast<int>(len[bt / T] - T + bt % T), static_cast<int>(nh), spans.data() + h, scores.data(),
                  op + (bt * H + h) * D);
    }
  }
  return out;
}

torch::Tensor cpu_matvec(const torch::Tensor& weight, const torch::Tensor& x, int64_t num_threads,
                         const std::string& isa) {
  check_cpu_tensor(weight, "cpu_matvec", "weight");
  check_cpu_tensor(x, "cpu_matvec", "x");
  TORCH_CHECK(is_weight_dtype(weight) && weight.dim() == 2, "cpu_matvec: weight must be (N, K) float32 or bfloat16, got ",
              weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.size(1) == weight.size(1) && x.size(0) >= 1,
              "cpu_matvec: x must be float32 (B, ", weight.size(1), "), got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(weight.size(0) < (int64_t{1} << 31) && weight.size(1) < (int64_t{1} << 31) && x.size(0) < (int64_t{1} << 31),
              "cpu_matvec: sizes too large");
  const auto kern = cd::kernels_for(parse_isa(isa));
  const int N = static_cast<int>(weight.size(0)), K = static_cast<int>(weight.size(1)), B = static_cast<int>(x.size(0));
  auto y = torch::empty({B, N}, torch::kFloat32);
  const bool bf16 = weight.scalar_type() == torch::kBFloat16;
  const void* w = weight.data_ptr();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int nt = num_threads > 0 ? static_cast<int>(num_threads) : at::get_num_threads();
  pybind11::gil_scoped_release no_gil;
#pragma omp parallel num_threads(nt)
  {
    int lo, hi;
    cd::split(N, 16, omp_get_thread_num(), omp_get_num_threads(), lo, hi);
    kern.dot_rows(w, bf16, K, lo, hi, xp, K, B, yp, N);
  }
  return y;
}

}  // namespace llama_fast
