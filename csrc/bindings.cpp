// The Python binding of llama_fast._C: declarations only, the work is in the other files.
#include <torch/extension.h>

#include "cpu_features.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_features", [] {
    const auto f = llama_fast::detect_cpu_features();
    return pybind11::dict(pybind11::arg("avx2") = f.avx2, pybind11::arg("fma") = f.fma,
                          pybind11::arg("avx512f") = f.avx512f, pybind11::arg("avx512bw") = f.avx512bw,
                          pybind11::arg("avx512vnni") = f.avx512vnni,
                          pybind11::arg("avx512bf16") = f.avx512bf16);
  }, "The x86-64 ISA extensions this CPU supports (detected at run time).");
}
