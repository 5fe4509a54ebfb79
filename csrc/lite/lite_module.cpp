// llama_fast._lite: the C++ decode session and the sampler for Python that has not imported torch (the
// command line's fast start, llama_fast/lite.py: `import torch` alone takes 2-4 s on a small machine).
// Built without libtorch: the same session_binding.h as llama_fast._C.
#include <pybind11/pybind11.h>

#include "session_binding.h"

PYBIND11_MODULE(_lite, m) {
  m.doc() = "llama_fast's C++ decode session and sampler without torch (see llama_fast/lite.py)";
  llama_fast::session::bind_session(m);
}
