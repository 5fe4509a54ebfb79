// The Python binding of llama_fast._C: declarations only, the work is in the other files.
#include <torch/extension.h>

#include "cpu_features.h"
#include "decode_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_features", [] {
    const auto f = llama_fast::detect_cpu_features();
    return pybind11::dict(pybind11::arg("avx2") = f.avx2, pybind11::arg("fma") = f.fma,
                          pybind11::arg("avx512f") = f.avx512f, pybind11::arg("avx512bw") = f.avx512bw,
                          pybind11::arg("avx512vnni") = f.avx512vnni,
                          pybind11::arg("avx512bf16") = f.avx512bf16);
  }, "The x86-64 ISA extensions this CPU supports (detected at run time).");

  namespace py = pybind11;
  py::class_<llama_fast::CpuDecoder>(m, "CpuDecoder",
                                     "The whole CPU decode step of a LLaMA-family model, one call per token.")
      .def(py::init<int64_t, int64_t, int64_t, double, torch::Tensor, torch::Tensor, torch::Tensor,
                    std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<torch::Tensor>, std::vector<torch::Tensor>, std::vector<torch::Tensor>, torch::Tensor,
                    std::optional<torch::Tensor>, std::optional<torch::Tensor>, int64_t, int64_t, double, double,
                    int64_t, const std::string&>(),
           py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("embedding"),
           py::arg("output"), py::arg("final_norm"), py::arg("attn_norm"), py::arg("wq"), py::arg("wk"),
           py::arg("wv"), py::arg("wo"), py::arg("ffn_norm"), py::arg("w1"), py::arg("w2"), py::arg("w3"),
           py::arg("rope_table"), py::arg("alibi_slopes") = py::none(), py::arg("bucket_table") = py::none(),
           py::arg("window") = 0, py::arg("sink_tokens") = 0, py::arg("logit_softcap") = 0.0,
           py::arg("scale") = 0.125, py::arg("num_threads") = 0, py::arg("isa") = "auto")
      .def("step", &llama_fast::CpuDecoder::step, py::arg("tokens"), py::arg("seqlens"), py::arg("k_cache"),
           py::arg("v_cache"))
      .def("set_rope_table", &llama_fast::CpuDecoder::set_rope_table, py::arg("table"))
      .def_property_readonly("isa", &llama_fast::CpuDecoder::isa)
      .def_property("num_threads", &llama_fast::CpuDecoder::num_threads, &llama_fast::CpuDecoder::set_num_threads);
  m.def("cpu_matvec", &llama_fast::cpu_matvec, py::arg("weight"), py::arg("x"), py::arg("num_threads") = 0,
        py::arg("isa") = "auto", "x (B, K) fp32 @ weight (N, K).T with the CPU decode step's kernels -> (B, N) fp32.");
}
