// KV cache on raw pointers: token copies into a static or paged pool, and the paged cache's block manager
// (free list, reference counts, per-sequence block tables, copy-on-write fork, window-with-sinks eviction).
// Torch-free. Every function here assumes arguments already validated by the host code; the BlockManager
// validates its own (sequence ids, capacity) and throws std::invalid_argument / std::out_of_range /
// KVCacheFull, leaving its state unchanged on error.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace llama_fast {

// ---- data movement ----

// Row b's T tokens (each `token_bytes` bytes: Hkv * D elements) go to positions start[b] + t of a
// contiguous cache (B, S_max, token).
inline void static_write_rows(char* cache, const char* src, const int32_t* start, int64_t B, int64_t T, int64_t S_max,
                              int64_t token_bytes, int64_t src_row_stride_bytes) {
#pragma omp parallel for collapse(2) if (B * T * token_bytes > (1 << 16))
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      std::memcpy(cache + (b * S_max + start[b] + t) * token_bytes, src + b * src_row_stride_bytes + t * token_bytes,
                  token_bytes);
}

// The same through a block table (B, max_blocks): position p lives in block table[b][p / bs] at p % bs.
inline void paged_write_rows(char* cache, const char* src, const int32_t* table, int64_t max_blocks,
                             const int32_t* start, int64_t B, int64_t T, int64_t block_size, int64_t token_bytes,
                             int64_t src_row_stride_bytes) {
#pragma omp parallel for collapse(2) if (B * T * token_bytes > (1 << 16))
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t pos = start[b] + t;
      const int64_t block = table[b * max_blocks + pos / block_size];
      std::memcpy(cache + (block * block_size + pos % block_size) * token_bytes,
                  src + b * src_row_stride_bytes + t * token_bytes, token_bytes);
    }
}

// ---- block manager ----

class KVCacheFull : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A pending copy of the first `tokens` token slots of block src into block dst (in every layer's pool).
struct BlockCopy {
  int32_t src, dst, tokens;
};

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size) : block_size_(block_size), refcount_(num_blocks, 0) {
    if (num_blocks < 1 || block_size < 1 || num_blocks > (int64_t(1) << 30) || block_size > (int64_t(1) << 20))
      throw std::invalid_argument("BlockManager: num_blocks must be in [1, 2^30] and block_size in [1, 2^20]");
    free_.reserve(num_blocks);
    for (int64_t i = num_blocks - 1; i >= 0; --i) free_.push_back(static_cast<int32_t>(i));  // pop 0 first
  }

  int64_t num_blocks() const { return static_cast<int64_t>(refcount_.size()); }
  int64_t block_size() const { return block_size_; }
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_sequences() const { return static_cast<int64_t>(seqs_.size()); }
  int32_t refcount(int64_t block) const {
    if (block < 0 || block >= num_blocks()) throw std::out_of_range("BlockManager: block id out of range");
    return refcount_[block];
  }

  int64_t add_sequence() {
    const int64_t id = next_id_++;
    seqs_.emplace(id, Seq{});
    return id;
  }

  // A new sequence sharing all of the parent's blocks (copy-on-write on the next write into a shared block).
  int64_t fork(int64_t parent) {
    const Seq& p = get(parent, "fork");
    Seq child = p;
    for (int32_t b : child.blocks) ++refcount_[b];
    const int64_t id = next_id_++;
    seqs_.emplace(id, std::move(child));
    return id;
  }

  void free(int64_t id) {
    Seq& s = get(id, "free");
    for (int32_t b : s.blocks) release(b);
    seqs_.erase(id);
  }

  int64_t length(int64_t id) const { return get(id, "length").length; }
  int64_t evicted(int64_t id) const { return get(id, "evicted").evicted; }
  const std::vector<int32_t>& blocks(int64_t id) const { return get(id, "blocks").blocks; }
  bool contains(int64_t id) const { return seqs_.count(id) != 0; }

  // Window-with-sinks eviction for the sequences `ids` before a step whose first new token gets position
  // L = length: tokens at positions [sinks, L - window + 1) are invisible to every future query. Whole
  // blocks' worth of them are dropped (their blocks go back to the pool once unshared); the sinks are
  // kept and the survivors are re-indexed compactly (`evicted` grows by the shift; keys keep their
  // rotation: a token's true position is its index + evicted, llama_fast/cache.py): every block holding
  // survivors is first made private to the sequence (copy-on-write). When sinks are not a multiple of
  // block_size, the sinks' partial block is copied into the block that takes its place. Pending copies are
  // appended to `copies`, in the order they must run, before any attention reads the pools. A sequence the
  // pool has no blocks to un-share for is left as it is this time (its invisible tokens stay, masked by the
  // window).
  void evict(const std::vector<int64_t>& ids, int64_t window, int64_t sinks, std::vector<BlockCopy>& copies) {
    if (window < 1 || sinks < 0 || sinks >= window)
      throw std::invalid_argument("evict: need window >= 1 and 0 <= sinks < window");
    for (int64_t id : ids) get(id, "evict");
    for (int64_t id : ids) {
      Seq& s = seqs_.at(id);
      if (window > s.length || sinks > s.length - window + 1) continue;  // (written so nothing overflows)
      const int64_t invisible = s.length - window + 1 - sinks;
      if (invisible < block_size_) continue;
      const int64_t k = invisible / block_size_;
      const int64_t a = sinks / block_size_, r = sinks % block_size_;
      // Blocks a .. a+k-1 go; block a (when r > 0) only after its sinks are copied out, so it is not reused here.
      const int64_t first_reusable = r > 0 ? a + 1 : a;
      int64_t shared = 0, reusable = 0;
      for (int64_t j = a + k; j < static_cast<int64_t>(s.blocks.size()); ++j) shared += refcount_[s.blocks[j]] > 1;
      for (int64_t j = first_reusable; j < a + k; ++j) reusable += refcount_[s.blocks[j]] == 1;
      if (shared > num_free_blocks() + reusable) continue;
      for (int64_t j = first_reusable; j < a + k; ++j) release(s.blocks[j]);
      for (int64_t j = a + k; j < static_cast<int64_t>(s.blocks.size()); ++j) {
        int32_t& block = s.blocks[j];
        if (refcount_[block] == 1) continue;
        const int64_t used = std::min<int64_t>(block_size_, s.length - j * block_size_);
        const int32_t fresh = take();
        copies.push_back({block, fresh, static_cast<int32_t>(used)});
        --refcount_[block];
        block = fresh;
      }
      if (r > 0) {
        copies.push_back({s.blocks[a], s.blocks[a + k], static_cast<int32_t>(r)});
        release(s.blocks[a]);
      }
      s.blocks.erase(s.blocks.begin() + a, s.blocks.begin() + a + k);
      s.length -= k * block_size_;
      s.evicted += k * block_size_;
    }
  }

  // Makes room for T new tokens in each sequence of `ids` (distinct): allocates blocks and un-shares the
  // partially filled last block (copy-on-write; copies appended to `copies`). Atomic: throws KVCacheFull
  // and changes nothing when the pool cannot hold the step. Returns each sequence's start position.
  std::vector<int32_t> reserve(const std::vector<int64_t>& ids, int64_t T, std::vector<BlockCopy>& copies,
                               int64_t max_length = (int64_t(1) << 31) - 1) {
    if (T < 0) throw std::invalid_argument("reserve: number of new tokens must be >= 0");
    if (max_length < 0) throw std::invalid_argument("reserve: max_length must be >= 0");
    max_length = std::min<int64_t>(max_length, (int64_t(1) << 31) - 1);  // positions are int32
    std::unordered_map<int64_t, int> seen;
    for (int64_t id : ids) {
      get(id, "reserve");
      if (seen[id]++) throw std::invalid_argument("reserve: sequence id " + std::to_string(id) + " appears twice in the batch");
    }
    for (int64_t id : ids) {
      const Seq& s = seqs_.at(id);
      if (T > max_length - s.length)
        throw KVCacheFull("sequence " + std::to_string(id) + " would hold " + std::to_string(s.length + T) +
                          " tokens; the cache allows " + std::to_string(max_length));
    }
    const int64_t need = blocks_needed(ids, T);
    if (need > num_free_blocks())
      throw KVCacheFull("KV cache out of blocks: this step needs " + std::to_string(need) + " more blocks of " +
                        std::to_string(block_size_) + " tokens, " + std::to_string(num_free_blocks()) + " of " +
                        std::to_string(num_blocks()) + " are free (free finished sequences or make the cache larger)");
    std::vector<int32_t> start;
    start.reserve(ids.size());
    for (int64_t id : ids) {
      Seq& s = seqs_.at(id);
      start.push_back(static_cast<int32_t>(s.length));
      if (T > 0 && s.length % block_size_ != 0 && refcount_[s.blocks.back()] > 1) {
        const int32_t fresh = take();
        copies.push_back({s.blocks.back(), fresh, static_cast<int32_t>(s.length % block_size_)});
        --refcount_[s.blocks.back()];
        s.blocks.back() = fresh;
      }
      while (static_cast<int64_t>(s.blocks.size()) < blocks_for(s.length + T)) s.blocks.push_back(take());
      s.reserved = T;
    }
    return start;
  }

  // Free blocks that reserve(ids, T) would take: the blocks T more tokens need, and a copy of each shared,
  // partially filled last block (copy-on-write).
  int64_t blocks_needed(const std::vector<int64_t>& ids, int64_t T) const {
    int64_t need = 0;
    for (int64_t id : ids) {
      const Seq& s = get(id, "blocks_needed");
      need += blocks_for(s.length + T) - static_cast<int64_t>(s.blocks.size());
      if (T > 0 && s.length % block_size_ != 0 && refcount_[s.blocks.back()] > 1) ++need;
    }
    return need;
  }

  // Ends a step: sequence ids[i] keeps kept[i] (<= reserved) of its reserved tokens; blocks reserved for
  // the rest go back to the pool.
  void commit(const std::vector<int64_t>& ids, const std::vector<int64_t>& kept) {
    if (kept.size() != ids.size()) throw std::invalid_argument("commit: one kept count per sequence");
    for (size_t i = 0; i < ids.size(); ++i) {
      const Seq& s = get(ids[i], "commit");
      if (kept[i] < 0 || kept[i] > s.reserved)
        throw std::invalid_argument("commit: sequence " + std::to_string(ids[i]) + " reserved " +
                                    std::to_string(s.reserved) + " tokens, cannot keep " + std::to_string(kept[i]));
    }
    for (size_t i = 0; i < ids.size(); ++i) {
      Seq& s = seqs_.at(ids[i]);
      s.length += kept[i];
      s.reserved = 0;
      while (static_cast<int64_t>(s.blocks.size()) > blocks_for(s.length)) {
        release(s.blocks.back());
        s.blocks.pop_back();
      }
    }
  }

  // Block table (B, width) of `ids`, padded with block 0 (never read: lengths bound every access).
  void fill_table(const std::vector<int64_t>& ids, int32_t* out, int64_t width) const {
    for (size_t i = 0; i < ids.size(); ++i) {
      const auto& blocks = get(ids[i], "block_table").blocks;
      if (static_cast<int64_t>(blocks.size()) > width) throw std::invalid_argument("fill_table: table too narrow");
      std::copy(blocks.begin(), blocks.end(), out + i * width);
      std::fill(out + i * width + blocks.size(), out + (i + 1) * width, 0);
    }
  }
  int64_t max_blocks(const std::vector<int64_t>& ids) const {
    int64_t w = 0;
    for (int64_t id : ids) w = std::max<int64_t>(w, get(id, "block_table").blocks.size());
    return w;
  }

 private:
  struct Seq {
    std::vector<int32_t> blocks;
    int64_t length = 0;    // committed tokens (positions 0 .. length - 1)
    int64_t reserved = 0;  // tokens reserved by the current step
    int64_t evicted = 0;   // tokens dropped by eviction so far
  };

  int64_t blocks_for(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }

  const Seq& get(int64_t id, const char* op) const {
    auto it = seqs_.find(id);
    if (it == seqs_.end())
      throw std::out_of_range(std::string(op) + ": unknown or freed sequence id " + std::to_string(id));
    return it->second;
  }
  Seq& get(int64_t id, const char* op) { return const_cast<Seq&>(static_cast<const BlockManager*>(this)->get(id, op)); }

  int32_t take() {
    if (free_.empty()) throw KVCacheFull("KV cache out of blocks");  // callers check first
    const int32_t b = free_.back();
    free_.pop_back();
    refcount_[b] = 1;
    return b;
  }
  void release(int32_t b) {
    if (--refcount_[b] == 0) free_.push_back(b);
  }

  int64_t block_size_;
  std::vector<int32_t> refcount_;
  std::vector<int32_t> free_;
  std::unordered_map<int64_t, Seq> seqs_;
  int64_t next_id_ = 0;
};

}  // namespace llama_fast
