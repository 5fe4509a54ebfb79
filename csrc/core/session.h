// The decode session: one route from token ids to logits on CPU, for any number of sequences at once.
// Torch-free; llama_fast._C and llama_fast._lite bind it (session_binding.h), the Python runner drives it.
//
// A Session owns
//   - the model description, built once from a name -> (pointer, dtype, shape) map of the weights (the
//     names of llama_fast.model.Transformer's state dict) and checked here;
//   - the paged KV cache: one pool of blocks per layer, and its bookkeeping, block_manager.h's BlockManager
//     (the one the PyTorch forward's PagedKVCache uses too): every sequence a table of blocks, fork with
//     copy-on-write, window-with-sinks eviction, and with prefix caching an index of full blocks by content
//     (a new sequence starts from the cached blocks of its longest cached prefix);
//   - the RoPE rows of each step's positions;
// and step() runs one pass over the weights for a batch of entries, each some new tokens of one sequence
// (one token of a decoding sequence, or a chunk of a prompt), and writes the logits of each entry's last
// token (or of every token). Prefill and decode are the same call.
//
// Batch invariance: every row's arithmetic depends on its own sequence only (the matrix kernels sum each
// output in one order whatever the number of vectors; attention reads one sequence's keys; no reduction
// crosses rows), so a sequence gets the same logits, bit for bit, alone, in any batch, and however its
// prompt was chunked.
//
// Positions under a window with sinks (StreamingLLM): token t of a sequence is scored against the window's
// keys at their true distance and against the sinks at sink_position(t), the position t would have in a
// cache holding only the sinks and the window: one rule for every sequence, applied per token. Eviction
// drops whole blocks of tokens no later query can see and re-indexes the rest (a token's cache index is t
// minus the tokens its sequence has evicted); attention reads by index, where a window key's distance is
// the true one and the sinks keep their index, so no eviction changes a number (docs/session.md). Keys are
// stored rotated at their true position; RoPE rows are computed per position, so streams run past any table.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <atomic>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "block_manager.h"
#include "cpu_decode.h"

namespace llama_fast {
namespace session {

namespace cd = cpu_decode;

// Bad arguments (a Python ValueError) and a pool with too few free blocks for a step (CacheFullError).
// The session's state is unchanged when either is thrown.
class BadArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};
using CacheFull = ::llama_fast::KVCacheFull;

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

#define SESSION_CHECK(cond, ...)                                                   \
  do {                                                                             \
    if (!(cond)) throw ::llama_fast::session::BadArgument(::llama_fast::session::cat(__VA_ARGS__)); \
  } while (0)

// A weight's type: F32, BF16 or a GGUF block type (quant.h). The KV cache is F32 or BF16.
using DType = cd::WType;

inline DType parse_dtype(const std::string& name, const std::string& what) {
  DType t;
  if (!cd::parse_wtype(name, t))
    throw BadArgument(what + ": dtype must be F32 or BF16, or for a matrix a GGUF block type (" +
                      cd::wtype_names(cd::WType::Q8_0) + "), got '" + name + "'");
  return t;
}

struct TensorRef {
  const void* data = nullptr;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
};
using WeightMap = std::unordered_map<std::string, TensorRef>;

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + ")";
}

// A quantized tensor is a matrix (rows, K) of whole blocks: K a multiple of its block (BadArgument otherwise).
inline void check_blocks(const std::string& name, const TensorRef& t) {
  const int block = cd::block_size(t.dtype);
  SESSION_CHECK(t.shape.size() == 2 && t.shape[1] % block == 0, "Session: tensor '", name, "' is ",
                cd::wtype_name(t.dtype), ", which needs a matrix (rows, K) with K a multiple of ", block, ", got ",
                shape_str(t.shape));
}

// Bytes of a tensor's data: its elements at 4 or 2 bytes, or its rows of blocks.
inline int64_t tensor_bytes(const std::string& name, const TensorRef& t) {
  if (cd::is_quantized(t.dtype)) {
    check_blocks(name, t);
    return t.shape[0] * cd::row_bytes(t.dtype, t.shape[1]);
  }
  int64_t numel = 1;
  for (int64_t d : t.shape) numel *= d;
  return numel * cd::block_bytes(t.dtype);
}

struct ModelShape {
  int n_layers = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  double norm_eps = 1e-5;
  int64_t max_positions = 0;  // tokens a sequence may hold without a window (the context); 0: no limit
};

// The span bias (docs/architecture.md): per-head tables as flat vectors, empty when absent.
struct SpanParams {
  std::vector<float> alibi_slopes;  // (n_heads,)
  std::vector<float> bucket_table;  // (n_heads, max_distance + 1): bias by span, the buckets already looked up
  int window = 0;                   // 0: none
  int sinks = 0;
  double logit_softcap = 0.0;       // 0: off
  double scale = 0.0;               // 0: 1 / sqrt(head_dim)
};

struct CacheParams {
  int64_t num_blocks = 0;
  int block_size = 16;
  DType kv_dtype = DType::F32;  // F32 or BF16
  bool prefix_caching = false;  // keep full blocks findable by content after their last holder frees them
};

// One entry of a step: `count` new tokens of sequence `seq` (tokens[offset, offset + count) of the step).
struct Entry {
  int64_t seq;
  int count;
};

class Session {
 public:
  Session(const ModelShape& shape, const WeightMap& weights, const SpanParams& span, std::vector<float> inv_freq,
          const CacheParams& cache, int num_threads, cd::Isa isa)
      : shape_(shape), isa_(isa), kern_(cd::kernels_for(isa)), inv_freq_(std::move(inv_freq)) {
    describe(weights);
    set_span(span);
    SESSION_CHECK(!inv_freq_.empty() && static_cast<int>(inv_freq_.size()) * 2 <= shape.head_dim,
                  "Session: inv_freq must have between 1 and head_dim / 2 (", shape.head_dim / 2, ") entries, got ",
                  inv_freq_.size());
    for (float f : inv_freq_) SESSION_CHECK(std::isfinite(f), "Session: inv_freq holds a non-finite value");
    SESSION_CHECK(cache.block_size >= 1 && cache.block_size <= 4096, "Session: block_size must be in [1, 4096], got ",
                  cache.block_size);
    SESSION_CHECK(cache.num_blocks >= 1 && cache.num_blocks <= (int64_t{1} << 30),
                  "Session: num_blocks must be in [1, 2^30], got ", cache.num_blocks);
    SESSION_CHECK(shape.max_positions >= 0, "Session: max_positions must be >= 0 (0: no limit)");
    SESSION_CHECK(!cd::is_quantized(cache.kv_dtype), "Session: kv_dtype must be F32 or BF16, got ",
                  cd::wtype_name(cache.kv_dtype));
    set_num_threads(num_threads);
    cache_ = cache;
    const size_t nkv = static_cast<size_t>(shape_.n_kv_heads) * shape_.head_dim;
    block_elems_ = static_cast<size_t>(cache.block_size) * nkv;
    const size_t esz = cache.kv_dtype == DType::BF16 ? 2 : 4;
    size_t pool_bytes = 0, total = 0;  // one layer's K (or V) pool; all of them
    SESSION_CHECK(!__builtin_mul_overflow(static_cast<size_t>(cache.num_blocks), block_elems_ * esz, &pool_bytes) &&
                      !__builtin_mul_overflow(pool_bytes, 2 * static_cast<size_t>(shape_.n_layers), &total) &&
                      total < (size_t{1} << 48),
                  "Session: a KV cache of ", cache.num_blocks, " blocks of ", cache.block_size, " tokens, ",
                  shape_.n_layers, " layers and ", nkv, " values per token is too large to allocate");
    // Not zeroed: a slot is always written before it is read.
    pools_.reset(new char[total]);
    for (int l = 0; l < shape_.n_layers; ++l) {
      k_.push_back(pools_.get() + (2 * l) * pool_bytes);
      v_.push_back(pools_.get() + (2 * l + 1) * pool_bytes);
    }
    blocks_ = BlockManager(cache.num_blocks, cache.block_size, cache.prefix_caching);
  }

  // ---- sequences (the bookkeeping is block_manager.h's) ----

  int64_t add_sequence() {
    std::lock_guard<std::mutex> lock(mutex_);
    return blocks_.add_sequence();
  }

  // A new sequence holding the same tokens, sharing every block (the partial last one is copied on the
  // next write into it).
  int64_t fork(int64_t parent) {
    std::lock_guard<std::mutex> lock(mutex_);
    check_sequence(parent, "fork");
    return blocks_.fork(parent);
  }

  void free(int64_t id) {
    std::lock_guard<std::mutex> lock(mutex_);
    check_sequence(id, "free");
    blocks_.free(id);
  }

  // Starts the empty sequence `id` from the cached blocks of the longest cached prefix of tokens[0, n)
  // (BlockManager::match_prefix, which refuses a sequence that holds tokens). Returns the tokens it now holds
  // (0 without prefix caching).
  int64_t match_prefix(int64_t id, const int64_t* tokens, int64_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    check_sequence(id, "match_prefix");
    check_tokens(tokens, n, "Session.match_prefix");
    return blocks_.match_prefix(id, tokens, n);
  }

  // Tokens the sequence has been fed (evicted ones included).
  int64_t length(int64_t id) const {
    std::lock_guard<std::mutex> lock(mutex_);
    check_sequence(id, "length");
    return true_length(id);
  }
  // Blocks the sequence holds (shared ones included).
  int64_t blocks_held(int64_t id) const {
    std::lock_guard<std::mutex> lock(mutex_);
    check_sequence(id, "blocks_held");
    return static_cast<int64_t>(blocks_.blocks(id).size());
  }
  bool contains(int64_t id) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return blocks_.contains(id);
  }
  int64_t num_sequences() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return blocks_.num_sequences();
  }
  int64_t num_blocks() const { return cache_.num_blocks; }
  // Blocks a step can take: never used, or cached but held by no sequence (evicted when taken).
  int64_t num_free_blocks() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return blocks_.num_free_blocks();
  }
  // Of those, the ones holding a findable prefix.
  int64_t num_cached_blocks() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return blocks_.num_cached_blocks();
  }
  // Tokens sequences started from cached blocks (match_prefix), since the session began.
  int64_t prefix_hit_tokens() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return blocks_.prefix_hit_tokens();
  }
  bool prefix_caching() const { return cache_.prefix_caching; }
  int block_size() const { return cache_.block_size; }

  int64_t blocks_for_sequence(int64_t tokens, int64_t step_tokens) const {
    return llama_fast::blocks_for_sequence(tokens, step_tokens, window_, sinks_, cache_.block_size);
  }

  // The position of token t against the sinks (see the top of this file).
  int64_t sink_position(int64_t t) const { return cd::sink_position(t, window_, sinks_); }

  // ---- the step ----

  // entries: distinct sequences with count >= 1 new tokens each; tokens: the entries' tokens one after the
  // other. logits: (entries, vocab) for each entry's last token, or (sum of counts, vocab) with all_logits.
  void step(const std::vector<Entry>& entries, const int64_t* tokens, int64_t num_tokens, bool all_logits,
            float* logits) {
    std::lock_guard<std::mutex> lock(mutex_);
    SESSION_CHECK(!entries.empty(), "Session.step: no entries");
    int64_t rows = 0;
    std::unordered_set<int64_t> seen;
    for (const Entry& e : entries) {
      check_sequence(e.seq, "step");
      const int64_t held = true_length(e.seq);
      SESSION_CHECK(seen.insert(e.seq).second, "Session.step: sequence ", e.seq, " appears twice in one step");
      SESSION_CHECK(e.count >= 1, "Session.step: sequence ", e.seq, " has ", e.count, " new tokens (need >= 1)");
      SESSION_CHECK(shape_.max_positions == 0 || window_ > 0 || held + e.count <= shape_.max_positions,
                    "Session.step: sequence ", e.seq, " would hold ", held + e.count,
                    " tokens, past the model's context of ", shape_.max_positions);
      SESSION_CHECK(held + e.count < (int64_t{1} << 31), "Session.step: sequence ", e.seq, " is too long");
      rows += e.count;
    }
    SESSION_CHECK(rows == num_tokens, "Session.step: the entries count ", rows, " tokens, got ", num_tokens);
    SESSION_CHECK(rows < (int64_t{1} << 24), "Session.step: too many tokens in one step (", rows, ")");
    check_tokens(tokens, rows, "Session.step");
    const auto [ids, counts] = split_entries(entries);
    evict(ids);
    std::vector<BlockCopy> copies;
    blocks_.reserve(ids, counts, copies);  // throws CacheFull, changing nothing, when the pool is short
    run_copies(copies);
    try {
      run(entries, tokens, static_cast<int>(rows), all_logits, logits);
    } catch (...) {
      blocks_.commit(ids, std::vector<int64_t>(ids.size(), 0));
      throw;
    }
    for (size_t i = 0; i < ids.size(); ++i) {
      blocks_.index_tokens(ids[i], tokens, counts[i]);
      tokens += counts[i];
    }
    blocks_.commit(ids, counts);
  }

  // Blocks a step with these entries would take from the pool (the tokens a window made invisible are
  // evicted first, as the step itself would); changes no number.
  int64_t blocks_needed(const std::vector<Entry>& entries) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Entry& e : entries) {
      check_sequence(e.seq, "blocks_needed");
      SESSION_CHECK(e.count >= 0, "Session.blocks_needed: a negative token count");
    }
    const auto [ids, counts] = split_entries(entries);
    evict(ids);
    return blocks_.blocks_needed(ids, counts);
  }

  // ---- settings ----

  // Logits per row: the output matrix's rows (the vocabulary, or a tensor-parallel rank's slice of it).
  int vocab() const { return desc_.vocab; }

  // Tensor parallelism: called with the (rows, dim) partial sums of each layer's two output projections,
  // which it must replace in place by their sum over the ranks (an all-reduce). It runs on the calling
  // thread while the step's other threads wait; an exception from it ends the step and is rethrown.
  using AllReduce = std::function<void(float* data, int64_t count)>;
  void set_all_reduce(AllReduce reduce) {
    std::lock_guard<std::mutex> lock(mutex_);
    all_reduce_ = std::move(reduce);
  }
  int num_threads() const { return num_threads_; }
  void set_num_threads(int n) {
    std::lock_guard<std::mutex> lock(mutex_);
    SESSION_CHECK(n >= 1 && n <= cd::kMaxThreads, "Session: num_threads must be in [1, ", cd::kMaxThreads, "], got ", n);
    num_threads_ = n;
  }
  const char* isa_name() const { return cd::isa_name(isa_); }
  int window() const { return window_; }
  int sinks() const { return sinks_; }

 private:
  void check_sequence(int64_t id, const char* op) const {
    if (!blocks_.contains(id)) throw BadArgument(cat("Session.", op, ": unknown or freed sequence id ", id));
  }
  int64_t true_length(int64_t id) const { return blocks_.length(id) + blocks_.evicted(id); }
  void check_tokens(const int64_t* tokens, int64_t n, const char* op) const {
    for (int64_t i = 0; i < n; ++i)
      SESSION_CHECK(tokens[i] >= 0 && tokens[i] < embed_vocab_, op, ": token id ", tokens[i], " at ", i,
                    " is outside [0, ", embed_vocab_, ")");
  }

  static std::pair<std::vector<int64_t>, std::vector<int64_t>> split_entries(const std::vector<Entry>& entries) {
    std::vector<int64_t> ids, counts;
    for (const Entry& e : entries) {
      ids.push_back(e.seq);
      counts.push_back(e.count);
    }
    return {ids, counts};
  }

  // Under a window, drops the blocks' worth of tokens no query from here on can see (the block manager's
  // rule, re-indexing the rest). Changes no number, only memory.
  void evict(const std::vector<int64_t>& ids) {
    if (window_ == 0) return;
    std::vector<BlockCopy> copies;
    blocks_.evict(ids, window_, sinks_, copies);
    run_copies(copies);
  }

  void run_copies(const std::vector<BlockCopy>& copies) {
    for (const BlockCopy& c : copies) copy_block(c.src, c.dst, c.tokens);
  }

  void copy_block(int32_t src, int32_t dst, int tokens) {
    const size_t esz = cache_.kv_dtype == DType::BF16 ? 2 : 4;
    const size_t bytes = static_cast<size_t>(tokens) * shape_.n_kv_heads * shape_.head_dim * esz;
    for (int l = 0; l < shape_.n_layers; ++l)
      for (char* pool : {k_[l], v_[l]}) std::memcpy(pool + dst * block_elems_ * esz, pool + src * block_elems_ * esz, bytes);
  }

  // [cos | sin] of position p (the first rot_dim dims of a head rotate), in fp32 as torch computes it.
  void rope_row(int64_t p, float* out) const {
    const int half = static_cast<int>(inv_freq_.size());
    for (int i = 0; i < half; ++i) {
      const float angle = static_cast<float>(p) * inv_freq_[i];
      out[i] = std::cos(angle);
      out[half + i] = std::sin(angle);
    }
  }

  // ---- the model ----

  const TensorRef& find(const WeightMap& w, const std::string& name) {
    auto it = w.find(name);
    SESSION_CHECK(it != w.end(), "Session: the weights have no tensor '", name, "'");
    SESSION_CHECK(it->second.data != nullptr, "Session: tensor '", name, "' has no data");
    used_.insert(name);
    return it->second;
  }
  // A matrix (rows, cols) of any weight type (each matrix its own).
  static cd::Matrix as_matrix(const std::string& name, const TensorRef& t) {
    if (cd::is_quantized(t.dtype)) check_blocks(name, t);
    return {t.data, t.dtype};
  }
  cd::Matrix matrix(const WeightMap& w, const std::string& name, int64_t rows, int64_t cols) {
    const TensorRef& t = find(w, name);
    SESSION_CHECK(t.shape == std::vector<int64_t>({rows, cols}), "Session: tensor '", name, "' must have shape (",
                  rows, ", ", cols, "), got ", shape_str(t.shape));
    return as_matrix(name, t);
  }
  const float* vector(const WeightMap& w, const std::string& name, int64_t n) {
    const TensorRef& t = find(w, name);
    SESSION_CHECK(t.shape == std::vector<int64_t>({n}), "Session: tensor '", name, "' must have shape (", n,
                  "), got ", shape_str(t.shape));
    SESSION_CHECK(!cd::is_quantized(t.dtype), "Session: tensor '", name, "' is ", cd::wtype_name(t.dtype),
                  ": norms and biases must be F32 or BF16");
    // Norm weights are read as fp32: a bf16 one is widened once into memory the session owns.
    if (t.dtype == DType::F32) return static_cast<const float*>(t.data);
    owned_.emplace_back(n);
    for (int64_t i = 0; i < n; ++i) owned_.back()[i] = cd::bf16_to_f32(static_cast<const uint16_t*>(t.data)[i]);
    return owned_.back().data();
  }

  // The model description from the weights (names as llama_fast.model.Transformer's state dict).
  void describe(const WeightMap& w) {
    const ModelShape& m = shape_;
    SESSION_CHECK(m.n_layers >= 1 && m.n_heads >= 1 && m.n_kv_heads >= 1 && m.n_heads % m.n_kv_heads == 0,
                  "Session: n_heads must be a positive multiple of n_kv_heads, got ", m.n_heads, " and ", m.n_kv_heads);
    SESSION_CHECK(m.head_dim >= 2 && m.head_dim % 2 == 0 && m.head_dim <= 1024, "Session: head_dim must be even, got ",
                  m.head_dim);
    SESSION_CHECK(m.norm_eps > 0 && std::isfinite(m.norm_eps), "Session: norm_eps must be > 0");
    const TensorRef& emb = find(w, "tok_embeddings.weight");
    SESSION_CHECK(emb.shape.size() == 2 && emb.shape[0] >= 1 && emb.shape[1] >= 1 && emb.shape[0] < (1 << 30) &&
                      emb.shape[1] < (1 << 20),
                  "Session: tok_embeddings.weight must be (vocab, dim), got ", shape_str(emb.shape));
    const int64_t vocab = emb.shape[0], dim = emb.shape[1];
    embed_vocab_ = static_cast<int>(vocab);
    const int64_t nq = int64_t{m.n_heads} * m.head_dim, nkv = int64_t{m.n_kv_heads} * m.head_dim;
    const TensorRef& w1 = find(w, "layers.0.feed_forward.w1.weight");
    SESSION_CHECK(w1.shape.size() == 2 && w1.shape[0] >= 1 && w1.shape[0] < (1 << 24),
                  "Session: layers.0.feed_forward.w1.weight must be (ffn_dim, dim), got ", shape_str(w1.shape));
    const int64_t ffn = w1.shape[0];
    desc_.dim = static_cast<int>(dim);
    desc_.n_layers = m.n_layers;
    desc_.n_heads = m.n_heads;
    desc_.n_kv_heads = m.n_kv_heads;
    desc_.head_dim = m.head_dim;
    desc_.ffn_dim = static_cast<int>(ffn);
    int64_t out_rows = vocab;  // a tensor-parallel rank's output holds its slice of the vocabulary
    if (w.count("output.weight")) {
      const TensorRef& out = find(w, "output.weight");
      SESSION_CHECK(out.shape.size() == 2 && out.shape[0] >= 1 && out.shape[0] <= vocab,
                    "Session: output.weight must be (rows <= vocab, dim), got ", shape_str(out.shape));
      out_rows = out.shape[0];
    }
    desc_.vocab = static_cast<int>(out_rows);
    desc_.eps = static_cast<float>(m.norm_eps);
    desc_.embedding = as_matrix("tok_embeddings.weight", emb);
    desc_.output = w.count("output.weight") ? matrix(w, "output.weight", out_rows, dim) : desc_.embedding;
    desc_.final_norm = vector(w, "norm.weight", dim);
    layers_.resize(m.n_layers);
    for (int l = 0; l < m.n_layers; ++l) {
      const std::string p = "layers." + std::to_string(l) + ".";
      cd::LayerWeights& L = layers_[l];
      L.attn_norm = vector(w, p + "attention_norm.weight", dim);
      L.wq = matrix(w, p + "attention.wq.weight", nq, dim);
      L.wk = matrix(w, p + "attention.wk.weight", nkv, dim);
      L.wv = matrix(w, p + "attention.wv.weight", nkv, dim);
      if (w.count(p + "attention.wq.bias")) {  // Qwen2's QKV biases: all three or none
        L.bq = vector(w, p + "attention.wq.bias", nq);
        L.bk = vector(w, p + "attention.wk.bias", nkv);
        L.bv = vector(w, p + "attention.wv.bias", nkv);
      }
      L.wo = matrix(w, p + "attention.wo.weight", dim, nq);
      L.ffn_norm = vector(w, p + "ffn_norm.weight", dim);
      L.w1 = matrix(w, p + "feed_forward.w1.weight", ffn, dim);
      L.w2 = matrix(w, p + "feed_forward.w2.weight", dim, ffn);
      L.w3 = matrix(w, p + "feed_forward.w3.weight", ffn, dim);
    }
    desc_.layers = layers_.data();
    for (const auto& kv : w)
      SESSION_CHECK(used_.count(kv.first), "Session: tensor '", kv.first, "' is not part of the model (",
                    m.n_layers, " layers)");
  }

  void set_span(const SpanParams& span) {
    const int H = shape_.n_heads;
    SESSION_CHECK(span.window >= 0 && span.sinks >= 0 && (span.window > 0 ? span.sinks < span.window : span.sinks == 0),
                  "Session: need window >= 0 (0: none) and 0 <= sinks < window (0 without a window), got window ",
                  span.window, ", sinks ", span.sinks);
    SESSION_CHECK(span.logit_softcap >= 0 && std::isfinite(span.logit_softcap), "Session: logit_softcap must be >= 0");
    SESSION_CHECK(span.scale >= 0 && std::isfinite(span.scale), "Session: scale must be >= 0 (0: 1/sqrt(head_dim))");
    SESSION_CHECK(span.alibi_slopes.empty() || static_cast<int>(span.alibi_slopes.size()) == H,
                  "Session: alibi_slopes must have n_heads (", H, ") entries, got ", span.alibi_slopes.size());
    SESSION_CHECK(span.bucket_table.size() % H == 0, "Session: bucket_table must be (n_heads=", H,
                  ", max_distance + 1), got ", span.bucket_table.size(), " values");
    slopes_ = span.alibi_slopes;
    buckets_ = span.bucket_table;
    window_ = span.window;
    sinks_ = span.sinks;
    const int per_head = static_cast<int>(buckets_.size() / H);
    spans_.assign(H, cd::HeadSpan{});
    for (int h = 0; h < H; ++h) {
      cd::HeadSpan& sp = spans_[h];
      sp.has_alibi = !slopes_.empty();
      sp.slope = slopes_.empty() ? 0.0f : slopes_[h];
      sp.buckets = buckets_.empty() ? nullptr : buckets_.data() + static_cast<size_t>(h) * per_head;
      sp.max_distance = per_head > 0 ? per_head - 1 : 0;
      sp.window = span.window;
      sp.sinks = span.sinks;
      sp.softcap = static_cast<float>(span.logit_softcap);
      sp.scale = static_cast<float>(span.scale > 0 ? span.scale : 1.0 / std::sqrt(static_cast<double>(shape_.head_dim)));
    }
    desc_.span = spans_.data();
  }

  // One pass over the weights for every row of the step (one OpenMP region, over the
  // paged cache): threads split each product by output rows and attention by (row, head run of a KV group),
  // weighted by the keys each row reads.
  void run(const std::vector<Entry>& entries, const int64_t* tokens, int R, bool all_logits, float* logits) {
    const cd::ModelDesc& m = desc_;
    const int dim = m.dim, D = m.head_dim, H = m.n_heads, Hkv = m.n_kv_heads, F = m.ffn_dim;
    const int nq = H * D, nkv = Hkv * D, nqkv = nq + 2 * nkv, group = H / Hkv, rot = 2 * static_cast<int>(inv_freq_.size());
    const int bs = cache_.block_size;
    const bool kv_bf16 = cache_.kv_dtype == DType::BF16;
    const size_t esz = kv_bf16 ? 2 : 4;
    const bool two_queries = window_ > 0 && sinks_ > 0;

    // Per row: its sequence's block table, its cache index, its true position t (index + evicted) and its
    // sink position.
    row_table_.resize(R);
    row_index_.resize(R);
    row_pos_.resize(R);
    row_sink_pos_.resize(R);
    row_keys_.resize(R);
    int max_visible = 1;
    for (int i = 0, r = 0; i < static_cast<int>(entries.size()); ++i) {
      const int64_t id = entries[i].seq, index = blocks_.length(id), t = index + blocks_.evicted(id);  // pre-commit
      const int32_t* table = blocks_.blocks(id).data();
      for (int j = 0; j < entries[i].count; ++j, ++r) {
        row_table_[r] = table;
        row_index_[r] = static_cast<int>(index + j);
        row_pos_[r] = static_cast<int>(t + j);
        row_sink_pos_[r] = static_cast<int>(sink_position(t + j));
        const int visible = window_ > 0 ? std::min(row_index_[r] + 1, window_ + sinks_) : row_index_[r] + 1;
        row_keys_[r] = visible;
        max_visible = std::max(max_visible, visible);
      }
    }
    // Rows whose logits are wanted: each entry's last, or all.
    out_rows_.clear();
    for (int i = 0, r = 0; i < static_cast<int>(entries.size()); ++i) {
      r += entries[i].count;
      if (all_logits)
        for (int j = r - entries[i].count; j < r; ++j) out_rows_.push_back(j);
      else
        out_rows_.push_back(r - 1);
    }
    const int n_out = static_cast<int>(out_rows_.size());

    const int gh = std::min(group, cd::kMaxGroupHeads);
    const size_t per_thread = static_cast<size_t>(R) * dim + static_cast<size_t>(gh) * max_visible + 16;
    const size_t need = static_cast<size_t>(R) * (dim + nqkv + nq + 2 * F + dim + 2 * rot) +
                        (two_queries ? static_cast<size_t>(R) * nq : 0) + per_thread * num_threads_ +
                        static_cast<size_t>(n_out) * dim;
    if (workspace_.size() < need) workspace_.resize(need);
    float* ws = workspace_.data();
    float* x = ws; ws += static_cast<size_t>(R) * dim;        // (R, dim) the residual stream
    float* qkv = ws; ws += static_cast<size_t>(R) * nqkv;     // (R, nq + 2 nkv)
    float* att = ws; ws += static_cast<size_t>(R) * nq;       // (R, nq)
    float* gate = ws; ws += static_cast<size_t>(R) * F;       // (R, F), then silu(gate) * up
    float* up = ws; ws += static_cast<size_t>(R) * F;
    float* tmp = ws; ws += static_cast<size_t>(R) * dim;
    float* cs = ws; ws += static_cast<size_t>(R) * rot;       // (R, rot) RoPE rows at t
    float* cs_sink = ws; ws += static_cast<size_t>(R) * rot;  // (R, rot) at the sink position
    float* q_sink = nullptr;                                  // (R, nq) the queries rotated for the sinks
    if (two_queries) { q_sink = ws; ws += static_cast<size_t>(R) * nq; }
    float* xo = ws; ws += static_cast<size_t>(n_out) * dim;   // (n_out, dim) normed rows for the logits
    float* per_thread_ws = ws;

    for (int r = 0; r < R; ++r) {
      cd::load_row(m.embedding, tokens[r], dim, x + static_cast<size_t>(r) * dim);
      rope_row(row_pos_[r], cs + static_cast<size_t>(r) * rot);
      if (two_queries) rope_row(row_sink_pos_[r], cs_sink + static_cast<size_t>(r) * rot);
    }

    const cd::Kernels kern = kern_;
    cd::SpinBarrier barrier;
    std::exception_ptr error;  // from all_reduce_: the step stops at the next layer boundary
    std::atomic<bool> failed{false};
#pragma omp parallel num_threads(num_threads_)
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
#pragma omp single
      barrier.n = nt;
      float* xn = per_thread_ws + t * per_thread;  // (R, dim) this thread's copy of the normed x
      float* scores = xn + static_cast<size_t>(R) * dim;
      int lo, hi;
      // Attention units (row, head run of one KV group) split over the threads by the keys they read: a prompt
      // chunk's last rows read many more than its first. The same split in every layer.
      int att_lo, att_hi;
      cd::split_by_cost(row_keys_.data(), R, H, t, nt, att_lo, att_hi);
      for (int l = 0; l < m.n_layers; ++l) {
        const cd::LayerWeights& w = m.layers[l];
        for (int r = 0; r < R; ++r) cd::rms_norm(x + r * dim, w.attn_norm, dim, m.eps, xn + r * dim);
        // QKV: rows split in whole heads, so each thread applies RoPE and fills the cache for its own heads.
        cd::split(nqkv, D, t, nt, lo, hi);
        {
          const cd::Matrix mats[3] = {w.wq, w.wk, w.wv};
          const int starts[4] = {0, nq, nq + nkv, nqkv};
          const float* biases[3] = {w.bq, w.bk, w.bv};
          for (int i = 0; i < 3; ++i) {
            const int a = std::max(lo, starts[i]), e = std::min(hi, starts[i + 1]);
            if (a >= e) continue;
            kern.dot_rows(mats[i].data, mats[i].type, dim, a - starts[i], e - starts[i], xn, dim, R, qkv + starts[i],
                          nqkv);
            if (biases[i] != nullptr)
              for (int r = 0; r < R; ++r)
                for (int c = a; c < e; ++c) qkv[static_cast<size_t>(r) * nqkv + c] += biases[i][c - starts[i]];
          }
        }
        for (int head = lo / D; head < hi / D; ++head) {
          for (int r = 0; r < R; ++r) {
            float* v = qkv + static_cast<size_t>(r) * nqkv + head * D;
            if (head < H && two_queries) {
              float* qs = q_sink + static_cast<size_t>(r) * nq + head * D;
              std::memcpy(qs, v, sizeof(float) * D);
              cd::rope(qs, cs_sink + static_cast<size_t>(r) * rot, rot);
            }
            if (head < H + Hkv) cd::rope(v, cs + static_cast<size_t>(r) * rot, rot);
            if (head >= H) {
              const bool is_k = head < H + Hkv;
              const int kh = is_k ? head - H : head - H - Hkv;
              const int index = row_index_[r];
              const size_t slot = static_cast<size_t>(row_table_[r][index / bs]) * block_elems_ +
                                  static_cast<size_t>(index % bs) * nkv + static_cast<size_t>(kh) * D;
              cd::store_row((is_k ? k_[l] : v_[l]) + slot * esz, kv_bf16, v, D);
            }
          }
        }
        barrier.wait();
        for (int u = att_lo, nh; u < att_hi; u += nh) {
          const int r = u / H, h = u % H, kh = h / group;
          nh = std::min({att_hi - u, (kh + 1) * group - h, cd::kMaxGroupHeads});
          const float* q = qkv + static_cast<size_t>(r) * nqkv + h * D;
          const float* qs = two_queries ? q_sink + static_cast<size_t>(r) * nq + h * D : q;
          kern.attend_paged(q, qs, k_[l] + static_cast<size_t>(kh) * D * esz, v_[l] + static_cast<size_t>(kh) * D * esz,
                            kv_bf16, row_table_[r], bs, block_elems_, nkv, D, row_index_[r], row_sink_pos_[r], nh,
                            m.span + h, scores, att + static_cast<size_t>(r) * nq + h * D);
        }
        barrier.wait();
        // x += w . in, for this thread's columns of x (the output projections, then the residual add); under
        // tensor parallelism the partial products are summed over the ranks first.
        auto project_add = [&](const cd::Matrix& wm, const float* in, int k) {
          cd::split(dim, 16, t, nt, lo, hi);
          kern.dot_rows(wm.data, wm.type, k, lo, hi, in, k, R, tmp, dim);
          if (all_reduce_) {
            barrier.wait();
            if (t == 0 && !failed) {
              try {
                all_reduce_(tmp, static_cast<int64_t>(R) * dim);
              } catch (...) {
                error = std::current_exception();
                failed = true;
              }
            }
            barrier.wait();
          }
          cd::split(dim, 16, t, nt, lo, hi);
          for (int r = 0; r < R; ++r) cd::add_into(x + r * dim + lo, tmp + r * dim + lo, hi - lo);
          barrier.wait();
        };
        project_add(w.wo, att, nq);
        for (int r = 0; r < R; ++r) cd::rms_norm(x + r * dim, w.ffn_norm, dim, m.eps, xn + r * dim);
        cd::split(F, 16, t, nt, lo, hi);
        kern.dot_rows(w.w1.data, w.w1.type, dim, lo, hi, xn, dim, R, gate, F);
        kern.dot_rows(w.w3.data, w.w3.type, dim, lo, hi, xn, dim, R, up, F);
        for (int r = 0; r < R; ++r) kern.silu_mul(gate + r * F + lo, up + r * F + lo, gate + r * F + lo, hi - lo);
        barrier.wait();
        project_add(w.w2, gate, F);
        if (failed) break;  // every thread sees it after the same barrier
      }
      if (!failed) {
        cd::split(n_out, 1, t, nt, lo, hi);
        for (int i = lo; i < hi; ++i)
          cd::rms_norm(x + static_cast<size_t>(out_rows_[i]) * dim, m.final_norm, dim, m.eps, xo + static_cast<size_t>(i) * dim);
        barrier.wait();
        cd::split(m.vocab, 16, t, nt, lo, hi);
        kern.dot_rows(m.output.data, m.output.type, dim, lo, hi, xo, dim, n_out, logits, m.vocab);
      }
    }
    if (error) std::rethrow_exception(error);
  }

  ModelShape shape_;
  cd::Isa isa_;
  cd::Kernels kern_;
  std::vector<float> inv_freq_;
  cd::ModelDesc desc_{};
  std::vector<cd::LayerWeights> layers_;
  std::vector<std::vector<float>> owned_;  // bf16 norm weights widened
  std::unordered_set<std::string> used_;
  std::vector<float> slopes_, buckets_;
  std::vector<cd::HeadSpan> spans_;
  int window_ = 0, sinks_ = 0;
  int num_threads_ = 1;
  int embed_vocab_ = 0;
  AllReduce all_reduce_;

  CacheParams cache_;
  size_t block_elems_ = 0;  // elements of one block in one layer's pool: block_size * n_kv_heads * head_dim
  std::unique_ptr<char[]> pools_;
  std::vector<char*> k_, v_;
  BlockManager blocks_{1, 1};  // replaced in the constructor, once the cache's parameters are checked

  std::vector<const int32_t*> row_table_;
  std::vector<int> row_index_, row_pos_, row_sink_pos_, row_keys_, out_rows_;
  std::vector<float> workspace_;
  mutable std::mutex mutex_;
};

}  // namespace session
}  // namespace llama_fast
