# Sourced by bootstrap.sh (llama-cpp-python, built from source by pip) and build_llama_cpp.sh (llama.cpp's
# programs): the compiler flags both builds of the peer take, so the binding and the programs run the same
# code. GGML_NATIVE compiles for this CPU; on an x86 CPU with AMX (Sapphire Rapids and later) that includes
# ggml's AMX matrix multiply, which segfaults in ggml_backend_amx_mul_mat on the first quantized matmul on
# the VMs we run on (llama-cpp-python 0.3.36, Xeon with amx_int8, 2026-12). An explicit -mno-amx-* wins
# over -march=native whatever the order, so the rest of the native tuning (AVX-512, VNNI, repacking) stays.
if [ "$(uname -m)" = x86_64 ]; then
    LLAMA_CPP_CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
else
    LLAMA_CPP_CFLAGS=""
fi
