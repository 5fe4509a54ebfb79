// Host code of the KV caches: validates every argument, then runs kv_cache.h on CPU tensors, or
// dispatches to kv_cache_cuda.cu for CUDA tensors.
#include <string>
#include <vector>

#include "ext.h"
#include "../core/block_manager.h"
#include "../core/kv_cache.h"

namespace llama_fast {
namespace {

void check_pool_pair(const torch::Tensor& kc, const torch::Tensor& vc, const char* op, const char* layout) {
  LF_CHECK_ARG(kc.dim() == 4, op, ": k_cache must have shape ", layout, ", got ", shape_str(kc));
  LF_CHECK_ARG(kc.sizes() == vc.sizes(), op, ": k_cache ", shape_str(kc), " and v_cache ", shape_str(vc),
               " must have the same shape");
  LF_CHECK_TYPE(kc.scalar_type() == vc.scalar_type(), op, ": k_cache and v_cache dtypes differ (", kc.scalar_type(),
                " vs ", vc.scalar_type(), ")");
  LF_CHECK_ARG(kc.device() == vc.device(), op, ": k_cache and v_cache live on different devices");
  LF_CHECK_ARG(kc.is_cpu() || kc.is_cuda(), op, ": caches must be on CPU or CUDA, got ", kc.device());
  LF_CHECK_ARG(kc.is_contiguous() && vc.is_contiguous(), op, ": k_cache and v_cache must be contiguous");
  LF_CHECK_ARG(!kc.is_same(vc), op, ": k_cache and v_cache must be different tensors");
}

// k, v (B, T, Hkv, D) against a cache whose last two dims are (Hkv, D); returns T.
int64_t check_new_tokens(const torch::Tensor& cache, const torch::Tensor& k, const torch::Tensor& v, int64_t B,
                         const char* op) {
  LF_CHECK_ARG(k.dim() == 4, op, ": k must have shape (B, T, Hkv, D), got ", shape_str(k));
  LF_CHECK_ARG(k.sizes() == v.sizes(), op, ": k ", shape_str(k), " and v ", shape_str(v), " must have the same shape");
  LF_CHECK_ARG(B < 0 || k.size(0) == B, op, ": k has ", k.size(0), " rows, the cache batch has ", B);
  LF_CHECK_ARG(k.size(2) == cache.size(2) && k.size(3) == cache.size(3), op, ": k ", shape_str(k),
               " does not match the cache's (Hkv, D) = (", cache.size(2), ", ", cache.size(3), ")");
  LF_CHECK_TYPE(k.scalar_type() == cache.scalar_type() && v.scalar_type() == cache.scalar_type(), op,
                ": k/v dtype ", k.scalar_type(), "/", v.scalar_type(), " differs from the cache's ", cache.scalar_type());
  LF_CHECK_ARG(k.device() == cache.device() && v.device() == cache.device(), op, ": k/v are on ", k.device(),
               ", the cache on ", cache.device());
  return k.size(1);
}

// start (B,) int32 -> a CPU copy, checked against [0, limit - T].
torch::Tensor check_start(const torch::Tensor& start, int64_t B, int64_t T, int64_t limit, const char* op,
                          const char* what) {
  LF_CHECK_TYPE(start.scalar_type() == torch::kInt32, op, ": start must be int32, got ", start.scalar_type());
  LF_CHECK_ARG(start.dim() == 1 && start.size(0) == B, op, ": start must have shape (B=", B, ",), got ", shape_str(start));
  auto s = start.to(torch::kCPU).contiguous();
  const int32_t* p = s.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    LF_CHECK_INDEX(p[b] >= 0, op, ": row ", b, ": negative start position ", p[b]);
    LF_CHECK_INDEX(static_cast<int64_t>(p[b]) + T <= limit, op, ": row ", b, ": tokens ", p[b], "..", p[b] + T - 1,
                   " exceed ", what, " (", limit, " positions)");
  }
  return s;
}

}  // namespace

void static_write(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& k, const torch::Tensor& v,
                  const torch::Tensor& start) {
  check_pool_pair(k_cache, v_cache, "static_write", "(B, S_max, Hkv, D)");
  const int64_t B = k_cache.size(0), S = k_cache.size(1);
  const int64_t T = check_new_tokens(k_cache, k, v, B, "static_write");
  const auto start_cpu = check_start(start, B, T, S, "static_write", "the cache length S_max");
  if (B == 0 || T == 0 || k.numel() == 0) return;
  if (k_cache.is_cuda()) {
#ifdef LLAMA_FAST_WITH_CUDA
    static_write_cuda(k_cache, v_cache, k, v, start.to(k_cache.device()));
    return;
#else
    LF_CHECK_ARG(false, "static_write: llama_fast._C was built without CUDA");
#endif
  }
  const int64_t token_bytes = k_cache.size(2) * k_cache.size(3) * k_cache.element_size();
  const auto kc = k.contiguous(), vc = v.contiguous();
  static_write_rows(static_cast<char*>(k_cache.data_ptr()), static_cast<const char*>(kc.data_ptr()),
                    start_cpu.data_ptr<int32_t>(), B, T, S, token_bytes, T * token_bytes);
  static_write_rows(static_cast<char*>(v_cache.data_ptr()), static_cast<const char*>(vc.data_ptr()),
                    start_cpu.data_ptr<int32_t>(), B, T, S, token_bytes, T * token_bytes);
}

void paged_write(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& k, const torch::Tensor& v,
                 const torch::Tensor& block_table, const torch::Tensor& start) {
  check_pool_pair(k_cache, v_cache, "paged_write", "(num_blocks, block_size, Hkv, D)");
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1);
  LF_CHECK_TYPE(block_table.scalar_type() == torch::kInt32, "paged_write: block_table must be int32, got ",
                block_table.scalar_type());
  LF_CHECK_ARG(block_table.dim() == 2, "paged_write: block_table must have shape (B, max_blocks), got ",
               shape_str(block_table));
  const int64_t B = block_table.size(0), W = block_table.size(1);
  const int64_t T = check_new_tokens(k_cache, k, v, B, "paged_write");
  LF_CHECK_ARG(bs >= 1, "paged_write: block_size must be >= 1");
  const auto start_cpu = check_start(start, B, T, W * bs, "paged_write", "the block table's capacity");
  const auto table_cpu = block_table.to(torch::kCPU).contiguous();
  const int32_t* tp = table_cpu.data_ptr<int32_t>();
  const int32_t* sp = start_cpu.data_ptr<int32_t>();
  if (T > 0) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = sp[b] / bs; j <= (sp[b] + T - 1) / bs; ++j) {
        const int32_t blk = tp[b * W + j];
        LF_CHECK_INDEX(blk >= 0 && blk < num_blocks, "paged_write: block_table[", b, ", ", j, "] = ", blk,
                       " is not a block of this cache (", num_blocks, " blocks)");
      }
    }
  }
  if (B == 0 || T == 0 || k.numel() == 0) return;
  if (k_cache.is_cuda()) {
#ifdef LLAMA_FAST_WITH_CUDA
    paged_write_cuda(k_cache, v_cache, k, v, block_table.to(k_cache.device()).contiguous(), start.to(k_cache.device()));
    return;
#else
    LF_CHECK_ARG(false, "paged_write: llama_fast._C was built without CUDA");
#endif
  }
  const int64_t token_bytes = k_cache.size(2) * k_cache.size(3) * k_cache.element_size();
  const auto kc = k.contiguous(), vc = v.contiguous();
  paged_write_rows(static_cast<char*>(k_cache.data_ptr()), static_cast<const char*>(kc.data_ptr()), tp, W, sp, B, T,
                   bs, token_bytes, T * token_bytes);
  paged_write_rows(static_cast<char*>(v_cache.data_ptr()), static_cast<const char*>(vc.data_ptr()), tp, W, sp, B, T,
                   bs, token_bytes, T * token_bytes);
}

void copy_blocks(std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches, const torch::Tensor& ops) {
  LF_CHECK_ARG(k_caches.size() == v_caches.size(), "copy_blocks: ", k_caches.size(), " K pools but ", v_caches.size(),
               " V pools");
  LF_CHECK_TYPE(ops.scalar_type() == torch::kInt64, "copy_blocks: ops must be int64, got ", ops.scalar_type());
  LF_CHECK_ARG(ops.dim() == 2 && ops.size(1) == 3, "copy_blocks: ops must have shape (N, 3), got ", shape_str(ops));
  LF_CHECK_ARG(ops.is_cpu(), "copy_blocks: ops must be a CPU tensor");
  if (k_caches.empty() || ops.size(0) == 0) return;
  const auto& first = k_caches[0];
  for (size_t l = 0; l < k_caches.size(); ++l) {
    check_pool_pair(k_caches[l], v_caches[l], "copy_blocks", "(num_blocks, block_size, Hkv, D)");
    LF_CHECK_ARG(k_caches[l].sizes() == first.sizes() && k_caches[l].scalar_type() == first.scalar_type() &&
                     k_caches[l].device() == first.device(),
                 "copy_blocks: layer ", l, "'s pool differs from layer 0's in shape, dtype or device");
  }
  const int64_t num_blocks = first.size(0), bs = first.size(1);
  const auto o = ops.contiguous();
  const int64_t* op = o.data_ptr<int64_t>();
  const int64_t N = o.size(0);
  for (int64_t i = 0; i < N; ++i) {
    LF_CHECK_INDEX(op[3 * i] >= 0 && op[3 * i] < num_blocks && op[3 * i + 1] >= 0 && op[3 * i + 1] < num_blocks,
                   "copy_blocks: op ", i, " copies block ", op[3 * i], " to ", op[3 * i + 1], ": outside [0, ", num_blocks, ")");
    LF_CHECK_INDEX(op[3 * i + 2] >= 0 && op[3 * i + 2] <= bs, "copy_blocks: op ", i, " copies ", op[3 * i + 2],
                   " tokens; a block holds ", bs);
  }
  if (first.is_cuda()) {
#ifdef LLAMA_FAST_WITH_CUDA
    copy_blocks_cuda(k_caches, v_caches, o);
    return;
#else
    LF_CHECK_ARG(false, "copy_blocks: llama_fast._C was built without CUDA");
#endif
  }
  const int64_t token_bytes = first.size(2) * first.size(3) * first.element_size();
  const int64_t L = static_cast<int64_t>(k_caches.size());
  std::vector<char*> pools;
  for (int64_t l = 0; l < L; ++l) {
    pools.push_back(static_cast<char*>(k_caches[l].data_ptr()));
    pools.push_back(static_cast<char*>(v_caches[l].data_ptr()));
  }
  // Ops run in order within a pool (a later op may read a block an earlier one wrote); pools in parallel.
#pragma omp parallel for if (2 * L * N * bs * token_bytes > (1 << 18))
  for (int64_t p = 0; p < 2 * L; ++p)
    for (int64_t i = 0; i < N; ++i)
      if (op[3 * i] != op[3 * i + 1])
        std::memcpy(pools[p] + op[3 * i + 1] * bs * token_bytes, pools[p] + op[3 * i] * bs * token_bytes,
                    op[3 * i + 2] * token_bytes);
}

torch::Tensor gather_paged(const torch::Tensor& cache, const torch::Tensor& block_ids, int64_t length) {
  LF_CHECK_ARG(cache.dim() == 4, "gather_paged: cache must have shape (num_blocks, block_size, Hkv, D), got ",
               shape_str(cache));
  LF_CHECK_TYPE(block_ids.scalar_type() == torch::kInt32, "gather_paged: block_ids must be int32, got ",
                block_ids.scalar_type());
  LF_CHECK_ARG(block_ids.dim() == 1, "gather_paged: block_ids must be 1-D, got ", shape_str(block_ids));
  const int64_t num_blocks = cache.size(0), bs = cache.size(1);
  LF_CHECK_ARG(bs >= 1, "gather_paged: block_size must be >= 1");
  LF_CHECK_INDEX(length >= 0 && length <= block_ids.size(0) * bs, "gather_paged: length ", length,
                 " needs more than the ", block_ids.size(0), " blocks given");
  const auto ids = block_ids.to(torch::kCPU).contiguous();
  const int64_t n = (length + bs - 1) / bs;
  for (int64_t j = 0; j < n; ++j) {
    const int32_t blk = ids.data_ptr<int32_t>()[j];
    LF_CHECK_INDEX(blk >= 0 && blk < num_blocks, "gather_paged: block id ", blk, " at ", j, " is outside [0, ",
                   num_blocks, ")");
  }
  auto used = ids.slice(0, 0, n).to(torch::kInt64).to(cache.device());
  return cache.index_select(0, used).reshape({n * bs, cache.size(2), cache.size(3)}).slice(0, 0, length).contiguous();
}

// ---- PagedBlockManager: the BlockManager behind a pybind-friendly, tensor-returning face ----

struct PagedBlockManager::Impl {
  BlockManager m;
  Impl(int64_t n, int64_t bs) : m(n, bs) {}
};

namespace {
torch::Tensor copies_tensor(const std::vector<BlockCopy>& copies) {
  auto t = torch::empty({static_cast<int64_t>(copies.size()), 3}, torch::kInt64);
  int64_t* p = t.data_ptr<int64_t>();
  for (size_t i = 0; i < copies.size(); ++i) {
    p[3 * i] = copies[i].src;
    p[3 * i + 1] = copies[i].dst;
    p[3 * i + 2] = copies[i].tokens;
  }
  return t;
}
}  // namespace

PagedBlockManager::PagedBlockManager(int64_t num_blocks, int64_t block_size) : impl_(new Impl(num_blocks, block_size)) {}
PagedBlockManager::~PagedBlockManager() { delete impl_; }
int64_t PagedBlockManager::num_blocks() const { return impl_->m.num_blocks(); }
int64_t PagedBlockManager::block_size() const { return impl_->m.block_size(); }
int64_t PagedBlockManager::num_free_blocks() const { return impl_->m.num_free_blocks(); }
int64_t PagedBlockManager::num_sequences() const { return impl_->m.num_sequences(); }
int32_t PagedBlockManager::refcount(int64_t block) const { return impl_->m.refcount(block); }
int64_t PagedBlockManager::add_sequence() { return impl_->m.add_sequence(); }
int64_t PagedBlockManager::fork(int64_t parent) { return impl_->m.fork(parent); }
void PagedBlockManager::free(int64_t seq) { impl_->m.free(seq); }
bool PagedBlockManager::contains(int64_t seq) const { return impl_->m.contains(seq); }
int64_t PagedBlockManager::length(int64_t seq) const { return impl_->m.length(seq); }
int64_t PagedBlockManager::evicted(int64_t seq) const { return impl_->m.evicted(seq); }
std::vector<int32_t> PagedBlockManager::blocks(int64_t seq) const { return impl_->m.blocks(seq); }

torch::Tensor PagedBlockManager::evict(const std::vector<int64_t>& seqs, int64_t window, int64_t sinks) {
  std::vector<BlockCopy> copies;
  impl_->m.evict(seqs, window, sinks, copies);
  return copies_tensor(copies);
}

int64_t PagedBlockManager::blocks_needed(const std::vector<int64_t>& seqs, int64_t num_new) const {
  return impl_->m.blocks_needed(seqs, std::vector<int64_t>(seqs.size(), num_new));
}

std::tuple<torch::Tensor, torch::Tensor> PagedBlockManager::reserve(const std::vector<int64_t>& seqs, int64_t num_new,
                                                                    int64_t max_length) {
  std::vector<BlockCopy> copies;  // (the BlockManager checks its arguments)
  const std::vector<int32_t> start =
      impl_->m.reserve(seqs, std::vector<int64_t>(seqs.size(), num_new), copies, max_length);
  auto s = torch::empty({static_cast<int64_t>(start.size())}, torch::kInt32);
  std::copy(start.begin(), start.end(), s.data_ptr<int32_t>());
  return {s, copies_tensor(copies)};
}

void PagedBlockManager::commit(const std::vector<int64_t>& seqs, const std::vector<int64_t>& kept) {
  impl_->m.commit(seqs, kept);
}

torch::Tensor PagedBlockManager::block_table(const std::vector<int64_t>& seqs, int64_t min_width) const {
  LF_CHECK_ARG(min_width >= 0 && min_width <= (int64_t(1) << 20), "block_table: min_width must be in [0, 2^20]");
  const int64_t width = std::max<int64_t>(std::max<int64_t>(min_width, impl_->m.max_blocks(seqs)), 1);
  auto t = torch::empty({static_cast<int64_t>(seqs.size()), width}, torch::kInt32);
  impl_->m.fill_table(seqs, t.data_ptr<int32_t>(), width);
  return t;
}

}  // namespace llama_fast
