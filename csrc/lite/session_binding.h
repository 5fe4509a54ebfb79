// The Python binding of the decode session (session.h), included by both modules: llama_fast._C (with
// torch) and llama_fast._lite (without). Nothing here knows torch: weights come as name -> (address,
// dtype, shape) with an owner object kept alive as long as the session (a GGUF quantized weight: (address or
// buffer of its raw blocks, "Q4_0", [rows, K]), the logical shape), logits go out as numpy arrays
// (torch.from_numpy shares them). Errors cross as registered types: BadArgument -> ValueError,
// CacheFull -> llama_fast.errors.CacheFullError.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <omp.h>

#include <optional>

#include "../core/sampling.h"
#include "../core/session.h"

namespace llama_fast {
namespace session {

namespace py = pybind11;

class PySession {
 public:
  PySession(int n_layers, int n_heads, int n_kv_heads, int head_dim, double norm_eps, int64_t max_positions,
            const py::dict& weights, py::object owner, std::vector<float> inv_freq, std::vector<float> alibi_slopes,
            std::vector<float> bucket_table, int window, int sinks, double logit_softcap, double scale,
            int64_t num_blocks, int block_size, const std::string& kv_dtype, int num_threads, const std::string& isa,
            bool prefix_caching)
      : owner_(std::move(owner)) {
    ModelShape shape;
    shape.n_layers = n_layers;
    shape.n_heads = n_heads;
    shape.n_kv_heads = n_kv_heads;
    shape.head_dim = head_dim;
    shape.norm_eps = norm_eps;
    shape.max_positions = max_positions;
    WeightMap map;
    for (const auto& item : weights) {
      const std::string name = py::cast<std::string>(item.first);
      const auto spec = py::cast<py::tuple>(item.second);
      SESSION_CHECK(spec.size() == 3, "Session: weight '", name, "' must be (address, dtype, shape)");
      TensorRef t;
      t.dtype = parse_dtype(py::cast<std::string>(spec[1]), "Session: weight '" + name + "'");
      t.shape = py::cast<std::vector<int64_t>>(spec[2]);
      if (py::isinstance<py::int_>(spec[0])) {
        t.data = reinterpret_cast<const void*>(py::cast<uintptr_t>(spec[0]));
      } else {  // a buffer (a slice of a memory-mapped file): its size is checked, and it stays exported
        SESSION_CHECK(py::isinstance<py::buffer>(spec[0]), "Session: weight '", name,
                      "' must be an address or a buffer");
        views_.push_back(std::make_unique<py::buffer_info>(py::cast<py::buffer>(spec[0]).request()));
        const int64_t bytes = views_.back()->size * views_.back()->itemsize, need = tensor_bytes(name, t);
        SESSION_CHECK(bytes == need, "Session: weight '", name, "' has ", bytes, " bytes, its shape ",
                      shape_str(t.shape), " and dtype ", cd::wtype_name(t.dtype), " need ", need);
        t.data = views_.back()->ptr;
      }
      map.emplace(name, std::move(t));
    }
    SpanParams span;
    span.alibi_slopes = std::move(alibi_slopes);
    span.bucket_table = std::move(bucket_table);
    span.window = window;
    span.sinks = sinks;
    span.logit_softcap = logit_softcap;
    span.scale = scale;
    CacheParams cache;
    cache.num_blocks = num_blocks;
    cache.block_size = block_size;
    cache.kv_dtype = parse_dtype(kv_dtype, "Session: kv_dtype");
    cache.prefix_caching = prefix_caching;
    std::string isa_error;
    const cd::Isa chosen = cd::parse_isa(isa, isa_error);
    SESSION_CHECK(isa_error.empty(), "Session: ", isa_error);
    SESSION_CHECK(num_threads >= 0, "Session: num_threads must be >= 0 (0: all cores OpenMP sees, at most ",
                  cd::kMaxThreads, "), got ", num_threads);
    session_ = std::make_unique<Session>(shape, map, span, std::move(inv_freq), cache,
                                         num_threads > 0 ? num_threads : std::min(omp_get_max_threads(), cd::kMaxThreads),
                                         chosen);
  }

  // seqs[i] gets counts[i] new tokens, taken in order from `tokens`; returns (len(seqs), vocab) logits of
  // each one's last token, or (len(tokens), vocab) with all_logits.
  py::array_t<float> step(const std::vector<int64_t>& seqs, const std::vector<int>& counts,
                          const std::vector<int64_t>& tokens, bool all_logits) {
    const std::vector<Entry> batch = entries(seqs, counts);
    const py::ssize_t rows = all_logits ? static_cast<py::ssize_t>(tokens.size()) : static_cast<py::ssize_t>(seqs.size());
    py::array_t<float> logits({rows, static_cast<py::ssize_t>(session_->vocab())});
    float* out = logits.mutable_data();
    {
      py::gil_scoped_release no_gil;
      session_->step(batch, tokens.data(), static_cast<int64_t>(tokens.size()), all_logits, out);
    }
    return logits;
  }

  int64_t blocks_needed(const std::vector<int64_t>& seqs, const std::vector<int>& counts) {
    return session_->blocks_needed(entries(seqs, counts));
  }

  // reduce(array): sums a float32 numpy array over the ranks in place (None: no tensor parallelism).
  void set_all_reduce(py::object reduce) {
    if (reduce.is_none()) {
      session_->set_all_reduce(nullptr);
      return;
    }
    session_->set_all_reduce([reduce](float* data, int64_t count) {
      py::gil_scoped_acquire gil;
      // A view of the session's buffer, not a copy: the base object only marks it as borrowed.
      reduce(py::array_t<float>({static_cast<py::ssize_t>(count)}, {static_cast<py::ssize_t>(sizeof(float))}, data,
                                py::none()));
    });
  }

  Session& get() { return *session_; }

 private:
  static std::vector<Entry> entries(const std::vector<int64_t>& seqs, const std::vector<int>& counts) {
    SESSION_CHECK(seqs.size() == counts.size(), "Session: one count per sequence, got ", seqs.size(),
                  " sequences and ", counts.size(), " counts");
    std::vector<Entry> out(seqs.size());
    for (size_t i = 0; i < seqs.size(); ++i) out[i] = {seqs[i], counts[i]};
    return out;
  }

  py::object owner_;  // whatever holds the weights' memory
  std::vector<std::unique_ptr<py::buffer_info>> views_;
  std::unique_ptr<Session> session_;
};

// The next token from one row of logits (sampling.h: penalties from `seen`, the counts of the tokens they see
// (vocab,) int32, or None; temperature 0 greedy, Philox(seed, step) draws): the torch-free sampler of the fast
// start, the same arithmetic as llama_fast._C.sample. The counts come from sampling.PenaltyWindow, as the
// engine's do.
inline int64_t sample_row(const py::array_t<float, py::array::c_style>& logits,
                          const std::optional<py::array_t<int32_t, py::array::c_style>>& seen, double temperature,
                          int64_t top_k, double top_p, double min_p, uint64_t seed, uint64_t step,
                          double repetition_penalty, double presence_penalty, double frequency_penalty) {
  SESSION_CHECK(logits.ndim() == 1 && logits.shape(0) >= 1, "sample_row: logits must be one row (vocab,)");
  const int64_t V = logits.shape(0);
  SESSION_CHECK(std::isfinite(temperature) && temperature >= 0, "sample_row: temperature must be >= 0");
  SESSION_CHECK(top_k >= 0 && top_p > 0 && top_p <= 1 && min_p >= 0 && min_p <= 1,
                "sample_row: need top_k >= 0, top_p in (0, 1], min_p in [0, 1]");
  SESSION_CHECK(std::isfinite(repetition_penalty) && repetition_penalty > 0 && std::isfinite(presence_penalty) &&
                    std::isfinite(frequency_penalty),
                "sample_row: need repetition_penalty > 0, finite presence and frequency penalties");
  SESSION_CHECK(!seen || (seen->ndim() == 1 && seen->shape(0) == V), "sample_row: seen must be (vocab,) = (", V,
                ",) int32 counts");
  SampleParams p;
  p.temperature = static_cast<float>(temperature);
  p.top_k = top_k >= V ? 0 : top_k;
  p.top_p = static_cast<float>(top_p);
  p.min_p = static_cast<float>(min_p);
  p.repetition_penalty = static_cast<float>(repetition_penalty);
  p.presence_penalty = static_cast<float>(presence_penalty);
  p.frequency_penalty = static_cast<float>(frequency_penalty);
  p.seed = seed;
  p.step = step;
  thread_local SampleWorkspace ws;
  ws.resize(V);
  std::copy(logits.data(), logits.data() + V, ws.x.begin());
  SESSION_CHECK(all_finite(ws.x.data(), V), "sample_row: the logits contain NaN or inf");
  if (p.has_penalties() && seen) apply_penalties_row(ws.x.data(), seen->data(), V, p);
  return sample_filtered_row(ws, V, p);
}

inline void bind_session(py::module_& m) {
  using namespace pybind11::literals;
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CacheFull& e) {
      py::object cls = py::module_::import("llama_fast.errors").attr("CacheFullError");
      PyErr_SetString(cls.ptr(), e.what());
    } catch (const BadArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  m.def("blocks_for_sequence", &blocks_for_sequence, "tokens"_a, "step_tokens"_a, "window"_a, "sinks"_a,
        "block_size"_a);
  m.def("sample_row", &sample_row, "logits"_a, "seen"_a, "temperature"_a, "top_k"_a, "top_p"_a, "min_p"_a,
        "seed"_a, "step"_a, "repetition_penalty"_a, "presence_penalty"_a, "frequency_penalty"_a);
  // module_local: _C and _lite both bind this type, and a process may load both.
  py::class_<PySession>(m, "Session", py::module_local(),
                        "The CPU decode session: the model's weights, a paged KV cache and a step over many sequences "
                        "(csrc/core/session.h).")
      .def(py::init<int, int, int, int, double, int64_t, const py::dict&, py::object, std::vector<float>,
                    std::vector<float>, std::vector<float>, int, int, double, double, int64_t, int, const std::string&,
                    int, const std::string&, bool>(),
           "n_layers"_a, "n_heads"_a, "n_kv_heads"_a, "head_dim"_a, "norm_eps"_a, "max_positions"_a, "weights"_a,
           "owner"_a, "inv_freq"_a, "alibi_slopes"_a, "bucket_table"_a, "window"_a, "sinks"_a, "logit_softcap"_a,
           "scale"_a, "num_blocks"_a, "block_size"_a, "kv_dtype"_a, "num_threads"_a, "isa"_a,
           "prefix_caching"_a = false)
      .def("step", &PySession::step, "seqs"_a, "counts"_a, "tokens"_a, "all_logits"_a = false)
      .def("blocks_needed", &PySession::blocks_needed, "seqs"_a, "counts"_a)
      .def("set_all_reduce", &PySession::set_all_reduce, "reduce"_a)
      .def("match_prefix", [](PySession& s, int64_t seq, const std::vector<int64_t>& tokens) {
             return s.get().match_prefix(seq, tokens.data(), static_cast<int64_t>(tokens.size()));
           }, "seq"_a, "tokens"_a)
      .def("add_sequence", [](PySession& s) { return s.get().add_sequence(); })
      .def("fork", [](PySession& s, int64_t seq) { return s.get().fork(seq); }, "seq"_a)
      .def("free", [](PySession& s, int64_t seq) { s.get().free(seq); }, "seq"_a)
      .def("length", [](PySession& s, int64_t seq) { return s.get().length(seq); }, "seq"_a)
      .def("blocks_held", [](PySession& s, int64_t seq) { return s.get().blocks_held(seq); }, "seq"_a)
      .def("__contains__", [](PySession& s, int64_t seq) { return s.get().contains(seq); }, "seq"_a)
      .def("blocks_for_sequence", [](PySession& s, int64_t tokens, int64_t step_tokens) {
             return s.get().blocks_for_sequence(tokens, step_tokens);
           }, "tokens"_a, "step_tokens"_a)
      .def("sink_position", [](PySession& s, int64_t t) { return s.get().sink_position(t); }, "t"_a)
      .def_property_readonly("num_sequences", [](PySession& s) { return s.get().num_sequences(); })
      .def_property_readonly("num_blocks", [](PySession& s) { return s.get().num_blocks(); })
      .def_property_readonly("num_free_blocks", [](PySession& s) { return s.get().num_free_blocks(); })
      .def_property_readonly("num_cached_blocks", [](PySession& s) { return s.get().num_cached_blocks(); })
      .def_property_readonly("prefix_hit_tokens", [](PySession& s) { return s.get().prefix_hit_tokens(); })
      .def_property_readonly("prefix_caching", [](PySession& s) { return s.get().prefix_caching(); })
      .def_property_readonly("block_size", [](PySession& s) { return s.get().block_size(); })
      .def_property_readonly("vocab", [](PySession& s) { return s.get().vocab(); })
      .def_property_readonly("isa", [](PySession& s) { return std::string(s.get().isa_name()); })
      .def_property("num_threads", [](PySession& s) { return s.get().num_threads(); },
                    [](PySession& s, int n) { s.get().set_num_threads(n); });
}

}  // namespace session
}  // namespace llama_fast
