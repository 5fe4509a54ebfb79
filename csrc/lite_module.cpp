// llama_fast._lite: the CPU decode step and the sampler for Python that has not imported torch (the
// command line's fast start, llama_fast/lite.py: `import torch` alone takes 2-4 s on a small machine).
// Built without libtorch; the work is the same cpu_decode.h and sampling.h that llama_fast._C runs.
// Weights are Python buffers (slices of a memory-mapped safetensors file), checked here once; the decoder
// owns its KV cache and its RoPE table. Bad input raises ValueError, never crashes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_decode.h"
#include "sampling.h"

namespace py = pybind11;
namespace cd = llama_fast::cpu_decode;

namespace {

template <typename... Args>
std::string cat(const Args&... args) {
  std::string s;
  ((s += [](const auto& a) {
     if constexpr (std::is_convertible_v<decltype(a), std::string>) return std::string(a);
     else return std::to_string(a);
   }(args)),
   ...);
  return s;
}

#define LITE_CHECK(cond, ...)                                    \
  do {                                                           \
    if (!(cond)) throw std::invalid_argument(cat(__VA_ARGS__));  \
  } while (0)

// Rows of one prompt chunk per step call: weights are read from memory once per chunk.
constexpr int kChunk = 32;

class LiteDecoder {
 public:
  // tensors: the model's names (as llama_fast.loaders writes them) -> (buffer, "F32" | "BF16", shape);
  // matrices share one dtype, which is also the KV cache's. "output.weight" absent: tied embeddings.
  // capacity: the most tokens the cache holds; num_threads 0: OpenMP's default. window > 0: keys `window` or
  // more positions behind a query are invisible except the first sink_tokens, and a feed that would
  // overflow the cache first evicts as streaming.StreamingKVCache does (see evict()).
  LiteDecoder(int n_layers, int n_heads, int n_kv_heads, int head_dim, int ffn_dim, double norm_eps,
              double rope_theta, const py::dict& tensors, int capacity, int num_threads, const std::string& isa,
              int window, int sink_tokens) {
    LITE_CHECK(n_layers >= 1 && n_heads >= 1 && n_kv_heads >= 1 && n_heads % n_kv_heads == 0,
               "LiteDecoder: n_heads must be a positive multiple of n_kv_heads, got ", n_heads, " and ", n_kv_heads);
    LITE_CHECK(head_dim >= 2 && head_dim % 2 == 0, "LiteDecoder: head_dim must be even, got ", head_dim);
    LITE_CHECK(ffn_dim >= 1 && norm_eps > 0 && rope_theta > 0, "LiteDecoder: ffn_dim, norm_eps and rope_theta must be > 0");
    LITE_CHECK(capacity >= 1 && capacity < (1 << 24), "LiteDecoder: capacity must be in [1, 2^24), got ", capacity);
    LITE_CHECK(num_threads >= 0 && num_threads <= 1024, "LiteDecoder: num_threads must be in [0, 1024], got ", num_threads);
    LITE_CHECK(window >= 0 && sink_tokens >= 0 && (window > 0 ? sink_tokens < window : sink_tokens == 0),
               "LiteDecoder: need window >= 0 (0: none) and 0 <= sink_tokens < window (0 without a window), got window ",
               window, ", sink_tokens ", sink_tokens);
    window_ = window;
    sinks_ = sink_tokens;
    std::string isa_error;
    isa_ = cd::parse_isa(isa, isa_error);
    LITE_CHECK(isa_error.empty(), "LiteDecoder: ", isa_error);
    num_threads_ = num_threads > 0 ? num_threads : omp_get_max_threads();

    const auto& emb = tensor(tensors, "tok_embeddings.weight", {-1, -1});
    desc_.w_bf16 = emb.bf16;
    const int vocab = static_cast<int>(emb.shape[0]), dim = static_cast<int>(emb.shape[1]);
    LITE_CHECK(vocab >= 1 && dim >= 1 && vocab < (1 << 30), "LiteDecoder: bad embedding shape");
    const int nq = n_heads * head_dim, nkv = n_kv_heads * head_dim;
    desc_.embedding = emb.data;
    desc_.output = tensors.contains("output.weight") ? matrix(tensors, "output.weight", vocab, dim) : emb.data;
    desc_.final_norm = norm(tensors, "norm.weight", dim);
    layers_.resize(n_layers);
    for (int l = 0; l < n_layers; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      auto& L = layers_[l];
      L.attn_norm = norm(tensors, p + "attention_norm.weight", dim);
      L.wq = matrix(tensors, p + "attention.wq.weight", nq, dim);
      L.wk = matrix(tensors, p + "attention.wk.weight", nkv, dim);
      L.wv = matrix(tensors, p + "attention.wv.weight", nkv, dim);
      L.wo = matrix(tensors, p + "attention.wo.weight", dim, nq);
      L.ffn_norm = norm(tensors, p + "ffn_norm.weight", dim);
      L.w1 = matrix(tensors, p + "feed_forward.w1.weight", ffn_dim, dim);
      L.w2 = matrix(tensors, p + "feed_forward.w2.weight", dim, ffn_dim);
      L.w3 = matrix(tensors, p + "feed_forward.w3.weight", ffn_dim, dim);
    }
    const size_t named = 3 + 9 * static_cast<size_t>(n_layers) - (tensors.contains("output.weight") ? 0 : 1);
    LITE_CHECK(tensors.size() == named, "LiteDecoder: got ", tensors.size(), " tensors, the model has ", named);

    // RoPE [cos | sin] per position, in fp32 as torch computes it (reference.rope_cos_sin_cache).
    const int half = head_dim / 2;
    rope_.resize(static_cast<size_t>(capacity) * head_dim);
    for (int i = 0; i < half; ++i) {
      const float inv_freq = 1.0f / std::pow(static_cast<float>(rope_theta), static_cast<float>(2 * i) / head_dim);
      for (int pos = 0; pos < capacity; ++pos) {
        const float angle = static_cast<float>(pos) * inv_freq;
        rope_[static_cast<size_t>(pos) * head_dim + i] = std::cos(angle);
        rope_[static_cast<size_t>(pos) * head_dim + half + i] = std::sin(angle);
      }
    }
    span_.assign(n_heads, cd::HeadSpan{});
    for (auto& sp : span_) {
      sp.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
      sp.window = window;
      sp.sinks = sink_tokens;
    }

    desc_.dim = dim;
    desc_.n_layers = n_layers;
    desc_.n_heads = n_heads;
    desc_.n_kv_heads = n_kv_heads;
    desc_.head_dim = head_dim;
    desc_.ffn_dim = ffn_dim;
    desc_.vocab = vocab;
    desc_.eps = static_cast<float>(norm_eps);
    desc_.layers = layers_.data();
    desc_.rope = rope_.data();
    desc_.rope_rows = capacity;
    desc_.rot_dim = head_dim;
    desc_.span = span_.data();

    capacity_ = capacity;
    const size_t per_layer = static_cast<size_t>(capacity) * nkv * (desc_.w_bf16 ? 2 : 4);
    kv_.reset(new char[2 * per_layer * n_layers]);  // not zeroed: nothing past length_ is read
    for (int l = 0; l < n_layers; ++l) {
      k_.push_back(kv_.get() + 2 * l * per_layer);
      v_.push_back(kv_.get() + (2 * l + 1) * per_layer);
    }
    logits_.resize(vocab);
  }

  // Appends tokens to the sequence and leaves the logits after the last one for sample() / logits().
  void feed(const std::vector<int64_t>& tokens) {
    LITE_CHECK(!tokens.empty(), "LiteDecoder.feed: no tokens");
    for (size_t i = 0; i < tokens.size(); ++i)
      LITE_CHECK(tokens[i] >= 0 && tokens[i] < desc_.vocab, "LiteDecoder.feed: token id ", tokens[i], " at ", i,
                 " is outside [0, ", desc_.vocab, ")");
    const int64_t n_new = static_cast<int64_t>(tokens.size());
    const bool evicts = window_ > 0 && length_ + n_new > capacity_;
    LITE_CHECK(evicts ? n_new <= capacity_ - sinks_ - (window_ - 1) : length_ + n_new <= capacity_, "LiteDecoder.feed: ",
               n_new, " more tokens do not fit: the cache holds ", length_, " of ", capacity_,
               window_ > 0 ? " and keeps its sinks and window - 1 tokens when it evicts" : "");
    py::gil_scoped_release no_gil;
    std::lock_guard<std::mutex> lock(mutex_);
    if (evicts) evict();
    workspace_.resize(cd::workspace_floats(desc_, kChunk, capacity_, num_threads_));
    for (size_t start = 0; start < tokens.size(); start += kChunk) {
      const int n = static_cast<int>(std::min<size_t>(kChunk, tokens.size() - start));
      for (int i = 0; i < n; ++i) positions_[i] = static_cast<int32_t>(length_ + i);
      cd::StepDesc s;
      s.batch = n;
      s.tokens = tokens.data() + start;
      s.positions = positions_.data();
      s.cache_rows = chunk_rows_.data();
      s.s_max = capacity_;
      s.kv_bf16 = desc_.w_bf16;
      s.k_cache = k_.data();
      s.v_cache = v_.data();
      s.logits_from = start + n == tokens.size() ? n - 1 : n;  // the last token's logits only
      s.logits = logits_.data();
      s.num_threads = num_threads_;
      s.workspace = workspace_.data();
      cd::decode_step(desc_, s, isa_);
      length_ += n;
    }
    history_.insert(history_.end(), tokens.begin(), tokens.end());
  }

  // The next token from the last logits (sampling.h: temperature 0 is greedy; Philox(seed, step) draws).
  // The penalties see the last penalty_last_n tokens fed (0: all of them, the prompt included), as
  // sampling.PenaltyCounts counts them for the engine.
  int64_t sample(double temperature, int64_t top_k, double top_p, double min_p, uint64_t seed, uint64_t step,
                 double repetition_penalty, double presence_penalty, double frequency_penalty, int64_t penalty_last_n) {
    LITE_CHECK(length_ > 0, "LiteDecoder.sample: feed tokens first");
    LITE_CHECK(std::isfinite(temperature) && temperature >= 0, "LiteDecoder.sample: temperature must be >= 0");
    LITE_CHECK(top_k >= 0 && top_p > 0 && top_p <= 1 && min_p >= 0 && min_p <= 1,
               "LiteDecoder.sample: need top_k >= 0, top_p in (0, 1], min_p in [0, 1]");
    LITE_CHECK(std::isfinite(repetition_penalty) && repetition_penalty > 0 && std::isfinite(presence_penalty) &&
                   std::isfinite(frequency_penalty) && penalty_last_n >= 0,
               "LiteDecoder.sample: need repetition_penalty > 0, finite presence and frequency penalties, "
               "penalty_last_n >= 0");
    std::lock_guard<std::mutex> lock(mutex_);
    llama_fast::SampleParams p;
    p.temperature = static_cast<float>(temperature);
    p.top_k = top_k >= desc_.vocab ? 0 : top_k;
    p.top_p = static_cast<float>(top_p);
    p.min_p = static_cast<float>(min_p);
    p.repetition_penalty = static_cast<float>(repetition_penalty);
    p.presence_penalty = static_cast<float>(presence_penalty);
    p.frequency_penalty = static_cast<float>(frequency_penalty);
    p.seed = seed;
    p.step = step;
    sample_ws_.resize(desc_.vocab);
    std::copy(logits_.begin(), logits_.end(), sample_ws_.x.begin());
    if (!llama_fast::all_finite(sample_ws_.x.data(), desc_.vocab))
      throw std::runtime_error("LiteDecoder.sample: the logits contain NaN or inf");
    if (p.has_penalties()) {
      // Counts of the window's tokens, set and cleared again here: O(window) per call, not O(vocab).
      const size_t n = history_.size(), from = penalty_last_n > 0 && static_cast<size_t>(penalty_last_n) < n
                                                     ? n - static_cast<size_t>(penalty_last_n) : 0;
      seen_.resize(desc_.vocab);
      for (size_t i = from; i < n; ++i) ++seen_[history_[i]];
      llama_fast::apply_penalties_row(sample_ws_.x.data(), seen_.data(), desc_.vocab, p);
      for (size_t i = from; i < n; ++i) seen_[history_[i]] = 0;
    }
    return llama_fast::sample_filtered_row(sample_ws_, desc_.vocab, p);
  }

  py::bytes logits() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {reinterpret_cast<const char*>(logits_.data()), logits_.size() * sizeof(float)};
  }
  int64_t length() const { return length_; }
  int64_t evicted() const { return evicted_; }
  int capacity() const { return capacity_; }
  int vocab() const { return desc_.vocab; }
  std::string isa() const { return cd::isa_name(isa_); }
  int num_threads() const { return num_threads_; }
  void set_num_threads(int n) {
    LITE_CHECK(n >= 1 && n <= 1024, "LiteDecoder: num_threads must be in [1, 1024], got ", n);
    num_threads_ = n;
  }

 private:
  struct Tensor {
    const void* data;
    bool bf16;
    std::vector<int64_t> shape;
  };

  // Keeps the sinks and the newest window - 1 tokens, moved down behind the sinks: positions are cache
  // positions, so the survivors' keys (stored rotated by RoPE) are rotated back by the shift, in fp32 and
  // rounded to the cache's dtype, as streaming.rotate_keys_back does for the engine.
  void evict() {
    const int keep = window_ - 1, shift = static_cast<int>(length_) - keep - sinks_;
    const int D = desc_.head_dim, half = D / 2, nkv = desc_.n_kv_heads * D;
    const float* cs = rope_.data() + static_cast<size_t>(shift) * D;  // [cos | sin] at position `shift`
    const size_t esz = desc_.w_bf16 ? 2 : 4;
    std::vector<float> row(nkv);
    for (int l = 0; l < desc_.n_layers; ++l) {
      char* k = static_cast<char*>(k_[l]);
      char* v = static_cast<char*>(v_[l]);
      for (int i = 0; i < keep; ++i) {  // ascending: a destination row is never a later source row
        const size_t from = static_cast<size_t>(sinks_ + shift + i) * nkv * esz;
        const size_t to = static_cast<size_t>(sinks_ + i) * nkv * esz;
        cd::load_row(k + from, desc_.w_bf16, 0, nkv, row.data());
        for (int h = 0; h < desc_.n_kv_heads; ++h) {
          float* x = row.data() + h * D;
          for (int j = 0; j < half; ++j) {
            const float x1 = x[j], x2 = x[half + j], c = cs[j], s = cs[half + j];
            x[j] = x1 * c + x2 * s;
            x[half + j] = x2 * c - x1 * s;
          }
        }
        cd::store_row(k + to, desc_.w_bf16, row.data(), nkv);
        std::memmove(v + to, v + from, nkv * esz);
      }
    }
    length_ = sinks_ + keep;
    evicted_ += shift;
  }

  // Checks tensors[name] = (buffer, dtype, shape) against the wanted shape (-1: any) and keeps its buffer
  // exported, so the memory it maps cannot be closed under the decoder.
  const Tensor& tensor(const py::dict& tensors, const std::string& name, const std::vector<int64_t>& want) {
    LITE_CHECK(tensors.contains(name), "LiteDecoder: missing tensor ", name);
    const auto entry = tensors[name.c_str()].cast<py::tuple>();
    LITE_CHECK(entry.size() == 3, "LiteDecoder: ", name, " must be (buffer, dtype, shape)");
    const auto dtype = entry[1].cast<std::string>();
    LITE_CHECK(dtype == "F32" || dtype == "BF16", "LiteDecoder: ", name, " is ", dtype, " (F32 and BF16 are read)");
    Tensor t{nullptr, dtype == "BF16", entry[2].cast<std::vector<int64_t>>()};
    LITE_CHECK(t.shape.size() == want.size(), "LiteDecoder: ", name, " must be ", want.size(), "-d");
    int64_t numel = 1;
    for (size_t i = 0; i < want.size(); ++i) {
      LITE_CHECK(t.shape[i] >= 1 && (want[i] < 0 || t.shape[i] == want[i]), "LiteDecoder: ", name, " dim ", i, " is ",
                 t.shape[i], ", expected ", want[i]);
      numel *= t.shape[i];
    }
    LITE_CHECK(py::isinstance<py::buffer>(entry[0]), "LiteDecoder: ", name, "'s data must be a buffer (memoryview, bytes)");
    views_.push_back(std::make_unique<py::buffer_info>(entry[0].cast<py::buffer>().request()));
    const auto& view = *views_.back();
    LITE_CHECK(view.size * view.itemsize == numel * (t.bf16 ? 2 : 4), "LiteDecoder: ", name, " has ",
               view.size * view.itemsize, " bytes, its shape and dtype need ", numel * (t.bf16 ? 2 : 4));
    t.data = view.ptr;
    tensors_.push_back(std::make_unique<Tensor>(std::move(t)));
    return *tensors_.back();
  }

  const void* matrix(const py::dict& tensors, const std::string& name, int64_t rows, int64_t cols) {
    const auto& t = tensor(tensors, name, {rows, cols});
    LITE_CHECK(t.bf16 == desc_.w_bf16, "LiteDecoder: ", name, " is ", t.bf16 ? "BF16" : "F32",
               ", the embedding is not (all matrices must share one dtype)");
    return t.data;
  }

  const float* norm(const py::dict& tensors, const std::string& name, int64_t n) {
    const auto& t = tensor(tensors, name, {n});
    norms_.emplace_back(n);
    for (int64_t i = 0; i < n; ++i)
      norms_.back()[i] = t.bf16 ? cd::bf16_to_f32(static_cast<const uint16_t*>(t.data)[i])
                                : static_cast<const float*>(t.data)[i];
    return norms_.back().data();
  }

  cd::Isa isa_;
  cd::ModelDesc desc_{};
  std::vector<cd::LayerWeights> layers_;
  std::vector<cd::HeadSpan> span_;
  std::vector<std::unique_ptr<py::buffer_info>> views_;
  std::vector<std::unique_ptr<Tensor>> tensors_;
  std::vector<std::vector<float>> norms_;
  std::vector<float> rope_;
  std::unique_ptr<char[]> kv_;
  std::vector<void*> k_, v_;
  std::vector<float> logits_;
  std::vector<float> workspace_;
  std::vector<int32_t> positions_ = std::vector<int32_t>(kChunk);   // of a chunk's rows
  std::vector<int32_t> chunk_rows_ = std::vector<int32_t>(kChunk);  // all 0: every row is in the one cache row
  llama_fast::SampleWorkspace sample_ws_;
  std::vector<int64_t> history_;  // every token fed, for the penalties
  std::vector<int32_t> seen_;     // (vocab,) all 0 between sample() calls
  std::mutex mutex_;
  int capacity_ = 0;
  int window_ = 0, sinks_ = 0;
  int64_t length_ = 0;
  int64_t evicted_ = 0;  // tokens dropped by evict() so far
  int num_threads_ = 1;
};

}  // namespace

PYBIND11_MODULE(_lite, m) {
  m.doc() = "llama_fast's CPU decode step and sampler without torch (see llama_fast/lite.py)";
  py::class_<LiteDecoder>(m, "LiteDecoder")
      .def(py::init<int, int, int, int, int, double, double, const py::dict&, int, int, const std::string&, int, int>(),
           py::arg("n_layers"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("ffn_dim"),
           py::arg("norm_eps"), py::arg("rope_theta"), py::arg("tensors"), py::arg("capacity"),
           py::arg("num_threads") = 0, py::arg("isa") = "auto", py::arg("window") = 0, py::arg("sink_tokens") = 0)
      .def("feed", &LiteDecoder::feed, py::arg("tokens"))
      .def("sample", &LiteDecoder::sample, py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("min_p"),
           py::arg("seed"), py::arg("step"), py::arg("repetition_penalty") = 1.0, py::arg("presence_penalty") = 0.0,
           py::arg("frequency_penalty") = 0.0, py::arg("penalty_last_n") = 0)
      .def("logits", &LiteDecoder::logits, "the last logits as float32 bytes (vocab,)")
      .def_property_readonly("length", &LiteDecoder::length)
      .def_property_readonly("evicted", &LiteDecoder::evicted)
      .def_property_readonly("capacity", &LiteDecoder::capacity)
      .def_property_readonly("vocab", &LiteDecoder::vocab)
      .def_property_readonly("isa", &LiteDecoder::isa)
      .def_property("num_threads", &LiteDecoder::num_threads, &LiteDecoder::set_num_threads);
}
