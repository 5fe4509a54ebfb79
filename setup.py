"""Builds llama_fast and its extension llama_fast._C.

The C++ sources (csrc/*.cpp, OpenMP) are built everywhere. The CUDA sources (csrc/*.cu) are added only
where torch itself was built with CUDA and a CUDA toolkit is present; on CPU-only torch they are checked
separately with nvcc (scripts/check_cuda_compile.sh). No -march=native: the extension must run on any
x86-64 machine it is copied to, so ISA-specific code paths are chosen at run time.
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if torch.version.cuda is not None and CUDA_HOME is not None and cuda_sources:
        return CUDAExtension(
            "llama_fast._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("LLAMA_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "llama_fast._C",
        cpp_sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="llama_fast",
    version="0.1.0",
    description="Fast LLaMA-family inference: span-biased attention kernels, C++ KV cache and sampler",
    python_requires=">=3.10",
    packages=["llama_fast", "llama_fast.kernels"],
    package_dir={"llama_fast": "llama_fast", "llama_fast.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    # The benchmark's llama.cpp columns (built from source: minutes): pip install -e .[bench]
    extras_require={"bench": ["llama-cpp-python==0.3.36"]},
    entry_points={"console_scripts": ["llama-fast = llama_fast.cli:main"]},
)
