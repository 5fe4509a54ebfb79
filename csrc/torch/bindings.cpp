// The Python binding of llama_fast._C: declarations only, the work is in the other files.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "../core/cpu_features.h"
#include "decode_cpu.h"
#include "ext.h"
#include "../core/block_manager.h"

namespace py = pybind11;
using namespace pybind11::literals;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_features", [] {
    const auto f = llama_fast::detect_cpu_features();
    return pybind11::dict(pybind11::arg("avx2") = f.avx2, pybind11::arg("fma") = f.fma,
                          pybind11::arg("avx512f") = f.avx512f, pybind11::arg("avx512bw") = f.avx512bw, pybind11::arg("avx512vl") = f.avx512vl,
                          pybind11::arg("avx512vnni") = f.avx512vnni,
                          pybind11::arg("avx512bf16") = f.avx512bf16, pybind11::arg("amx_bf16") = f.amx_bf16);
  }, "The x86-64 ISA extensions this CPU supports (detected at run time).");

  m.def("cpu_isas", [] {
    std::vector<std::string> names;
    for (int i = 0; i <= static_cast<int>(llama_fast::cpu_decode::Isa::Amx); ++i)
      if (llama_fast::cpu_decode::isa_supported(static_cast<llama_fast::cpu_decode::Isa>(i)))
        names.push_back(llama_fast::cpu_decode::isa_name(static_cast<llama_fast::cpu_decode::Isa>(i)));
    return names;
  }, "The kernel variants (isa= names) this CPU runs, lowest first.");

  m.def("cpu_bf16_timing", []() -> py::object {
    namespace cd = llama_fast::cpu_decode;
    if (cd::top_isa() < cd::Isa::Avx512Bf16) return py::none();
    const cd::Bf16Timing t = cd::time_bf16_products();
    return py::dict("fma_ns"_a = t.fma_ns, "dot_ns"_a = t.dot_ns);
  }, "ns per 16-lane FMA and per vdpbf16ps, as `auto` times them to choose avx512bf16 or avx512vnni (None without "
     "AVX512-BF16).");

  m.attr("with_cuda") =
#ifdef LLAMA_FAST_WITH_CUDA
      true;
#else
      false;
#endif

  // Sampling
  m.def("sample", &llama_fast::sample, "logits"_a, "params"_a, "seeds"_a, "steps"_a, "seen"_a = py::none(),
        "return_logprobs"_a = false,
        "logits (B, V) -> (tokens (B,) int64, logprobs (B,) fp32 or None). params (B, 7) fp64 rows [temperature, "
        "top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty]; seeds, steps (B,) int64; "
        "seen (B, V) int32/int64 counts or None.",
        py::call_guard<py::gil_scoped_release>());
  m.def("apply_penalties", &llama_fast::apply_penalties, "logits"_a, "seen"_a, "params"_a,
        "The penalised logits (B, V) fp32, as reference.apply_penalties computes them.");

  // KV cache data movement
  m.def("static_write", &llama_fast::static_write, "k_cache"_a, "v_cache"_a, "k"_a, "v"_a, "start"_a,
        "Writes k, v (B, T, Hkv, D) into a static cache (B, S_max, Hkv, D) at positions start[b] + t.",
        py::call_guard<py::gil_scoped_release>());
  m.def("paged_write", &llama_fast::paged_write, "k_cache"_a, "v_cache"_a, "k"_a, "v"_a, "block_table"_a, "start"_a,
        "Writes k, v (B, T, Hkv, D) into a paged pool (num_blocks, block_size, Hkv, D) through block_table.",
        py::call_guard<py::gil_scoped_release>());
  m.def("copy_blocks", &llama_fast::copy_blocks, "k_caches"_a, "v_caches"_a, "ops"_a,
        "Runs block copies ops (N, 3) int64 [src, dst, tokens] in order on every layer's pools.",
        py::call_guard<py::gil_scoped_release>());
  m.def("gather_paged", &llama_fast::gather_paged, "cache"_a, "block_ids"_a, "length"_a,
        "The first `length` tokens of a paged sequence as a contiguous (length, Hkv, D) tensor.");

  py::register_exception<llama_fast::KVCacheFull>(m, "KVCacheFull", PyExc_RuntimeError);
  py::class_<llama_fast::PagedBlockManager>(m, "PagedBlockManager",
                                            "Block allocator and per-sequence block tables of a paged KV cache.")
      .def(py::init<int64_t, int64_t>(), "num_blocks"_a, "block_size"_a)
      .def_property_readonly("num_blocks", &llama_fast::PagedBlockManager::num_blocks)
      .def_property_readonly("block_size", &llama_fast::PagedBlockManager::block_size)
      .def_property_readonly("num_free_blocks", &llama_fast::PagedBlockManager::num_free_blocks)
      .def_property_readonly("num_sequences", &llama_fast::PagedBlockManager::num_sequences)
      .def("refcount", &llama_fast::PagedBlockManager::refcount, "block"_a)
      .def("add_sequence", &llama_fast::PagedBlockManager::add_sequence)
      .def("fork", &llama_fast::PagedBlockManager::fork, "parent"_a)
      .def("free", &llama_fast::PagedBlockManager::free, "seq"_a)
      .def("__contains__", &llama_fast::PagedBlockManager::contains, "seq"_a)
      .def("length", &llama_fast::PagedBlockManager::length, "seq"_a)
      .def("evicted", &llama_fast::PagedBlockManager::evicted, "seq"_a)
      .def("blocks", &llama_fast::PagedBlockManager::blocks, "seq"_a)
      .def("evict", &llama_fast::PagedBlockManager::evict, "seqs"_a, "window"_a, "sinks"_a)
      .def("blocks_needed", &llama_fast::PagedBlockManager::blocks_needed, "seqs"_a, "num_new"_a)
      .def("reserve", &llama_fast::PagedBlockManager::reserve, "seqs"_a, "num_new"_a, "max_length"_a)
      .def("commit", &llama_fast::PagedBlockManager::commit, "seqs"_a, "kept"_a)
      .def("block_table", &llama_fast::PagedBlockManager::block_table, "seqs"_a, "min_width"_a = 0);

  // The CPU kernels of the session, as ops of the PyTorch forward
  m.def("cpu_matvec", &llama_fast::cpu_matvec, py::arg("weight"), py::arg("x"), py::arg("num_threads") = 0,
        py::arg("isa") = "auto", py::arg("wtype") = "",
        "x (B, K) fp32 @ weight (N, K).T with the CPU decode step's kernels -> (B, N) fp32. With wtype a GGUF type "
        "(Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K) the weight is its raw blocks, uint8 (N, row bytes).");
  m.def("cpu_dequantize", &llama_fast::cpu_dequantize, py::arg("raw"), py::arg("wtype"), py::arg("K"),
        "Raw GGUF blocks uint8 (N, row bytes) of rows of K values -> (N, K) fp32.");
  m.def("cpu_quantize_activations", &llama_fast::cpu_quantize_activations, py::arg("x"), py::arg("wtype"),
        py::arg("isa") = "auto",
        "x (B, K) fp32 as the quantized kernels of `isa` multiply wtype weights by it (per-block int8, dequantized).");
  m.def("cpu_attention", &llama_fast::cpu_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("seqlens"), py::arg("alibi_slopes") = py::none(), py::arg("bucket_table") = py::none(),
        py::arg("window") = 0, py::arg("sink_tokens") = 0, py::arg("logit_softcap") = 0.0, py::arg("scale") = 0.125,
        py::arg("q_sink") = py::none(), py::arg("block_table") = py::none(), py::arg("num_threads") = 0,
        py::arg("isa") = "auto", "Span-biased attention of T new queries per row over a contiguous or paged KV cache (decode_cpu.h).");
  m.def("cpu_rms_norm", &llama_fast::cpu_rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"),
        py::arg("residual") = py::none(), "RMSNorm of x (+ residual) on fp32 CPU tensors -> (normed, sum).");
  m.def("cpu_rope", &llama_fast::cpu_rope, py::arg("q"), py::arg("k"), py::arg("positions"), py::arg("cos_sin_cache"),
        "Rotates q and k (fp32, CPU) in place.");
  m.def("cpu_swiglu", &llama_fast::cpu_swiglu, py::arg("gate"), py::arg("up"), "silu(gate) * up on fp32 CPU tensors.");
}
