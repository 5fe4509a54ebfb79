// The paged KV cache's bookkeeping, the one implementation both routes use (the C++ decode session,
// session.h, and the PyTorch forward's PagedKVCache through llama_fast._C): a free list and reference counts
// over a pool of fixed-size blocks, a block table per sequence, fork with copy-on-write, window-with-sinks
// eviction, and optional prefix caching (full blocks found by content). It moves no data: a copy it
// decides on is appended to a list of BlockCopy that the caller runs on every layer's pools before any
// attention reads them. Torch-free. It validates its own arguments (sequence ids, counts, capacity) and throws
// std::invalid_argument / std::out_of_range / KVCacheFull, leaving its state unchanged on error.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace llama_fast {

class KVCacheFull : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A pending copy of the first `tokens` token slots of block src into block dst (in every layer's pool).
struct BlockCopy {
  int32_t src, dst, tokens;
};

// The largest block a pool takes, in tokens.
constexpr int64_t kMaxBlockSize = int64_t(1) << 20;

// Blocks of block_size tokens a sequence of `tokens` tokens holds at most, fed at most step_tokens at a time:
// all of them, or under a window (window > 0) what eviction leaves before a step (the sinks, window - 1
// tokens and less than a block more) plus the step's.
inline int64_t blocks_for_sequence(int64_t tokens, int64_t step_tokens, int64_t window, int64_t sinks,
                                   int64_t block_size) {
  constexpr int64_t kMost = int64_t(1) << 40;  // (far past any cache; keeps the sums below from overflowing)
  if (block_size < 1 || block_size > kMaxBlockSize)
    throw std::invalid_argument("blocks_for_sequence: block_size must be in [1, 2^20], got " + std::to_string(block_size));
  for (int64_t n : {tokens, step_tokens, window, sinks})
    if (n < 0 || n > kMost)
      throw std::invalid_argument("blocks_for_sequence: tokens, step_tokens, window and sinks must be in [0, 2^40], got " +
                                  std::to_string(n));
  const int64_t bs = block_size, all = (tokens + bs - 1) / bs;
  if (window == 0) return all;
  return std::min(all, (sinks + window + bs - 2 + step_tokens + bs - 1) / bs);
}

class BlockManager {
 public:
  static constexpr int64_t kMaxLength = (int64_t(1) << 31) - 1;  // tokens a sequence holds at most: indices are int32

  BlockManager(int64_t num_blocks, int64_t block_size, bool prefix_caching = false)
      : block_size_(block_size), prefix_caching_(prefix_caching), refcount_(checked_count(num_blocks, block_size), 0) {
    free_.reserve(num_blocks);
    for (int64_t i = num_blocks - 1; i >= 0; --i) free_.push_back(static_cast<int32_t>(i));  // pop 0 first
    if (prefix_caching) cached_.resize(num_blocks);
  }

  int64_t num_blocks() const { return static_cast<int64_t>(refcount_.size()); }
  int64_t block_size() const { return block_size_; }
  // Blocks a step can take: never used, or cached but held by no sequence (dropped from the index when taken).
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size() + unused_.size()); }
  // Of those, the ones holding a findable prefix.
  int64_t num_cached_blocks() const { return static_cast<int64_t>(unused_.size()); }
  // Tokens sequences started from cached blocks (match_prefix), since the manager began.
  int64_t prefix_hit_tokens() const { return hit_tokens_; }
  bool prefix_caching() const { return prefix_caching_; }
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

  // A new sequence holding the same tokens, sharing every block (copy-on-write on the next write into a
  // shared block).
  int64_t fork(int64_t parent) {
    Seq child = get(parent, "fork");
    for (int32_t b : child.blocks) ++refcount_[b];
    const int64_t id = next_id_++;
    seqs_.emplace(id, std::move(child));
    return id;
  }

  void free(int64_t id) {
    Seq& s = get(id, "free");
    // Last block first: of one sequence's cached blocks, the tail leaves the cache before the prefix it extends.
    for (auto it = s.blocks.rbegin(); it != s.blocks.rend(); ++it) release(*it);
    seqs_.erase(id);
  }

  // Tokens the cache holds for the sequence (its block table's index space); its true length is
  // length + evicted.
  int64_t length(int64_t id) const { return get(id, "length").length; }
  int64_t evicted(int64_t id) const { return get(id, "evicted").evicted; }
  const std::vector<int32_t>& blocks(int64_t id) const { return get(id, "blocks").blocks; }
  bool contains(int64_t id) const { return seqs_.count(id) != 0; }

  // Starts the empty sequence `id` from the cached blocks of the longest cached prefix of tokens[0, n), in
  // whole blocks and leaving at least one token to compute (its logits are what the caller wants). Returns
  // the tokens it now holds (0 without prefix caching). A block matches only if its tokens and those of
  // every block before it are equal: a hash chain (as vLLM's automatic prefix caching), each entry checked
  // against the tokens it stores.
  int64_t match_prefix(int64_t id, const int64_t* tokens, int64_t n) {
    Seq& s = get(id, "match_prefix");
    if (s.length != 0 || s.evicted != 0)
      throw std::invalid_argument("match_prefix: sequence " + std::to_string(id) + " already holds " +
                                  std::to_string(s.length + s.evicted) + " tokens");
    if (!prefix_caching_) return 0;
    std::vector<int32_t> block_tokens(block_size_);
    for (int64_t i = 0; (i + 1) * block_size_ < n; ++i) {
      for (int64_t j = 0; j < block_size_; ++j) block_tokens[j] = static_cast<int32_t>(tokens[i * block_size_ + j]);
      const uint64_t h = chain_hash(s.chain, block_tokens);
      auto it = by_hash_.find(h);
      if (it == by_hash_.end() || cached_[it->second].parent != s.chain || cached_[it->second].tokens != block_tokens)
        break;
      const int32_t b = it->second;
      if (refcount_[b]++ == 0) unused_.erase(cached_[b].last_use);
      s.blocks.push_back(b);
      s.chain = h;
      s.length += block_size_;
    }
    hit_tokens_ += s.length;
    return s.length;
  }

  // Window-with-sinks eviction for the sequences `ids` before a step whose first new token gets index
  // L = length: tokens at indices [sinks, L - window + 1) are invisible to every future query. Whole
  // blocks' worth of them are dropped (their blocks go back to the pool once unshared); the sinks are
  // kept and the survivors are re-indexed compactly (`evicted` grows by the shift; keys keep the rotation
  // of their true position, index + evicted: for a window key the index distance is the true distance, and
  // docs/session.md says why the sinks score alike): every block holding survivors is first made private
  // to the sequence (copy-on-write). When sinks are not a multiple of block_size, the sinks' partial block
  // is copied into the block that takes its place (over invisible tokens). A sequence the pool has no blocks
  // to un-share for is left as it is this time (its invisible tokens stay, masked by the window). A sequence
  // that has evicted indexes no more blocks for prefix caching (its blocks no longer start at token 0).
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
        unindex(s.blocks[a + k]);  // its first r slots change
        copies.push_back({s.blocks[a], s.blocks[a + k], static_cast<int32_t>(r)});
        release(s.blocks[a]);
      }
      s.blocks.erase(s.blocks.begin() + a, s.blocks.begin() + a + k);
      s.length -= k * block_size_;
      s.evicted += k * block_size_;
      s.indexing = false;
    }
  }

  // Makes room for counts[i] new tokens in sequence ids[i] (distinct ids): allocates blocks and un-shares
  // the partially filled last block (copy-on-write; copies appended to `copies`). Atomic: throws
  // KVCacheFull and changes nothing when the pool cannot hold the step. Returns each sequence's start index.
  std::vector<int32_t> reserve(const std::vector<int64_t>& ids, const std::vector<int64_t>& counts,
                               std::vector<BlockCopy>& copies, int64_t max_length = kMaxLength) {
    check_counts(ids, counts, "reserve");
    if (max_length < 0) throw std::invalid_argument("reserve: max_length must be >= 0");
    max_length = std::min<int64_t>(max_length, kMaxLength);
    std::unordered_map<int64_t, int> seen;
    for (int64_t id : ids)
      if (seen[id]++)
        throw std::invalid_argument("reserve: sequence id " + std::to_string(id) + " appears twice in the batch");
    for (size_t i = 0; i < ids.size(); ++i) {
      const Seq& s = seqs_.at(ids[i]);
      if (counts[i] > max_length - s.length)
        throw KVCacheFull("sequence " + std::to_string(ids[i]) + " would hold " + std::to_string(s.length + counts[i]) +
                          " tokens; the cache allows " + std::to_string(max_length));
    }
    const int64_t need = count_needed(ids, counts);
    if (need > num_free_blocks())
      throw KVCacheFull("KV cache out of blocks: this step needs " + std::to_string(need) + " more blocks of " +
                        std::to_string(block_size_) + " tokens, " + std::to_string(num_free_blocks()) + " of " +
                        std::to_string(num_blocks()) + " are free (free finished sequences or make the cache larger)");
    std::vector<int32_t> start;
    start.reserve(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      Seq& s = seqs_.at(ids[i]);
      start.push_back(static_cast<int32_t>(s.length));
      if (counts[i] > 0 && shared_partial(s)) {
        const int32_t fresh = take();
        copies.push_back({s.blocks.back(), fresh, static_cast<int32_t>(s.length % block_size_)});
        --refcount_[s.blocks.back()];
        s.blocks.back() = fresh;
      }
      while (static_cast<int64_t>(s.blocks.size()) < blocks_for(s.length + counts[i])) s.blocks.push_back(take());
      s.reserved = counts[i];
    }
    return start;
  }

  // Free blocks that reserve(ids, counts) would take: the blocks the new tokens need, and a copy of each
  // shared, partially filled last block a sequence writes into (k of a block's r holders writing: k
  // copies, or r - 1 when all do, the last keeping the block).
  int64_t blocks_needed(const std::vector<int64_t>& ids, const std::vector<int64_t>& counts) const {
    check_counts(ids, counts, "blocks_needed");
    for (size_t i = 0; i < ids.size(); ++i)  // (as reserve refuses them: so the sums below cannot overflow)
      if (counts[i] > kMaxLength - seqs_.at(ids[i]).length)
        throw KVCacheFull("sequence " + std::to_string(ids[i]) + " would hold more than 2^31 - 1 tokens");
    return count_needed(ids, counts);
  }

  // With prefix caching: indexes the blocks that the `count` tokens reserved for sequence `id` fill, before
  // commit (a block already indexed under the same content, a duplicate computed alongside, stays
  // unindexed and is freed normally).
  void index_tokens(int64_t id, const int64_t* tokens, int64_t count) {
    Seq& s = get(id, "index_tokens");
    if (count < 0 || count > s.reserved)
      throw std::invalid_argument("index_tokens: sequence " + std::to_string(id) + " reserved " +
                                  std::to_string(s.reserved) + " tokens, got " + std::to_string(count));
    if (!prefix_caching_ || !s.indexing) return;
    for (int64_t j = 0; j < count; ++j) {
      s.partial.push_back(static_cast<int32_t>(tokens[j]));
      if (static_cast<int64_t>(s.partial.size()) < block_size_) continue;
      const uint64_t h = chain_hash(s.chain, s.partial);
      const int32_t b = s.blocks[(s.length + j) / block_size_];
      if (cached_[b].tokens.empty() && !by_hash_.count(h)) {
        cached_[b].hash = h;
        cached_[b].parent = s.chain;
        cached_[b].tokens = s.partial;
        by_hash_.emplace(h, b);
      }
      s.chain = h;
      s.partial.clear();
    }
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
    int64_t length = 0;    // tokens held (indices 0 .. length - 1)
    int64_t reserved = 0;  // tokens reserved by the current step
    int64_t evicted = 0;   // tokens dropped by eviction so far
    // With prefix caching: the hash chain up to the last full block and the tokens of the partial one;
    // indexing stops once the sequence evicts.
    uint64_t chain = 0;
    std::vector<int32_t> partial;
    bool indexing = true;
  };
  // A full block findable by content: its tokens and the chain hash of the blocks before it.
  struct CachedBlock {
    uint64_t hash = 0, parent = 0;
    std::vector<int32_t> tokens;  // empty: not indexed
    uint64_t last_use = 0;        // when its last holder let it go (the key in unused_)
  };

  int64_t blocks_for(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }

  // num_blocks, checked with block_size before the constructor allocates anything.
  static int64_t checked_count(int64_t num_blocks, int64_t block_size) {
    if (num_blocks < 1 || block_size < 1 || num_blocks > (int64_t(1) << 30) || block_size > kMaxBlockSize)
      throw std::invalid_argument("BlockManager: num_blocks must be in [1, 2^30] and block_size in [1, 2^20], got " +
                                  std::to_string(num_blocks) + " and " + std::to_string(block_size));
    return num_blocks;
  }

  const Seq& get(int64_t id, const char* op) const {
    auto it = seqs_.find(id);
    if (it == seqs_.end())
      throw std::out_of_range(std::string(op) + ": unknown or freed sequence id " + std::to_string(id));
    return it->second;
  }
  Seq& get(int64_t id, const char* op) { return const_cast<Seq&>(static_cast<const BlockManager*>(this)->get(id, op)); }

  void check_counts(const std::vector<int64_t>& ids, const std::vector<int64_t>& counts, const char* op) const {
    if (counts.size() != ids.size()) throw std::invalid_argument(std::string(op) + ": one token count per sequence");
    for (size_t i = 0; i < ids.size(); ++i) {
      get(ids[i], op);
      if (counts[i] < 0) throw std::invalid_argument(std::string(op) + ": number of new tokens must be >= 0");
    }
  }

  // blocks_needed on arguments already checked.
  int64_t count_needed(const std::vector<int64_t>& ids, const std::vector<int64_t>& counts) const {
    int64_t need = 0;
    std::unordered_map<int32_t, int> writers;
    for (size_t i = 0; i < ids.size(); ++i) {
      const Seq& s = seqs_.at(ids[i]);
      need += std::max<int64_t>(blocks_for(s.length + counts[i]) - static_cast<int64_t>(s.blocks.size()), 0);
      if (counts[i] > 0 && shared_partial(s)) ++writers[s.blocks.back()];
    }
    for (const auto& [block, k] : writers) need += std::min(k, refcount_[block] - 1);
    return need;
  }

  bool shared_partial(const Seq& s) const {
    return s.length % block_size_ != 0 && refcount_[s.blocks.back()] > 1;
  }

  static uint64_t chain_hash(uint64_t parent, const std::vector<int32_t>& tokens) {
    uint64_t h = parent ^ 0x9e3779b97f4a7c15ull;
    for (int32_t t : tokens) {  // splitmix64 over (h, t): every token moves every bit
      h += static_cast<uint64_t>(static_cast<uint32_t>(t)) + 0x9e3779b97f4a7c15ull;
      h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
      h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
      h ^= h >> 31;
    }
    return h;
  }

  void unindex(int32_t b) {
    if (!prefix_caching_ || cached_[b].tokens.empty()) return;
    by_hash_.erase(cached_[b].hash);
    cached_[b].tokens.clear();
  }

  // A block for new tokens: a never-used one, else the least recently used cached one (dropped from the
  // index). Callers check num_free_blocks first.
  int32_t take() {
    int32_t b;
    if (!free_.empty()) {
      b = free_.back();
      free_.pop_back();
    } else if (!unused_.empty()) {
      auto oldest = unused_.begin();
      b = oldest->second;
      unused_.erase(oldest);
      unindex(b);
    } else {
      throw KVCacheFull("KV cache out of blocks");
    }
    refcount_[b] = 1;
    return b;
  }
  void release(int32_t b) {
    if (--refcount_[b] != 0) return;
    if (prefix_caching_ && !cached_[b].tokens.empty()) {
      cached_[b].last_use = ++clock_;
      unused_.emplace(clock_, b);
    } else {
      free_.push_back(b);
    }
  }

  int64_t block_size_;
  bool prefix_caching_;
  std::vector<int32_t> refcount_;
  std::vector<int32_t> free_;                     // blocks holding nothing findable
  std::vector<CachedBlock> cached_;               // per block: its index entry (prefix caching)
  std::unordered_map<uint64_t, int32_t> by_hash_;
  std::map<uint64_t, int32_t> unused_;            // cached blocks no sequence holds, by last use (oldest first)
  uint64_t clock_ = 0;
  int64_t hit_tokens_ = 0;
  std::unordered_map<int64_t, Seq> seqs_;
  int64_t next_id_ = 0;
};

}  // namespace llama_fast
