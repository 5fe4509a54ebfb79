"""Triton kernels, installed as llama_fast.kernels (one op per file; references in llama_fast/reference.py).

With the repository root on sys.path this folder is also importable as a top-level `kernels`, which
`transformers` probes for (the Hugging Face kernels hub). Imported under that name it defines nothing
and imports nothing, so the probe finds no usable version and moves on (tests/test_api.py).
"""

if __name__ == "llama_fast.kernels":
    from .decode_attention import decode_attention
    from .quant_matmul import (dequantize_int4, dequantize_int8, int4_matmul, int8_matmul, quantize_int4,
                               quantize_int8)
    from .rms_norm import rms_norm
    from .rope import apply_rope
    from .span_attention import span_attention
    from .swiglu import swiglu

    __all__ = ["apply_rope", "decode_attention", "dequantize_int4", "dequantize_int8", "int4_matmul", "int8_matmul",
               "quantize_int4", "quantize_int8", "rms_norm", "span_attention", "swiglu"]
