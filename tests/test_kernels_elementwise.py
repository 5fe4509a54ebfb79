"""Triton RMSNorm, RoPE and SwiGLU against the reference (interpreter, fp32 and fp16)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama_fast import ops, reference
from llama_fast.kernels import apply_rope, rms_norm, swiglu

ROOT = Path(__file__).resolve().parents[1]


def ulp_tol(dtype, ref):
    """One unit in the last place of the output dtype at the largest |value| (rounding may flip), fp32: 1e-5."""
    if dtype == torch.float32:
        return 1e-5 * max(1.0, ref.abs().max().item())
    return torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dim,shape", [(576, (3, 5)), (64, (1,)), (1000, (2, 1, 3))])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, dim, shape, with_residual):
    gen = torch.Generator().manual_seed(dim + len(shape))
    x = torch.randn(*shape, dim, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)
    residual = torch.randn(*shape, dim, generator=gen).to(dtype) if with_residual else None
    got = rms_norm(x, weight, 1e-6, residual)
    want = reference.rms_norm(x, weight, 1e-6, residual)
    if with_residual:
        (got, got_res), (want, want_res) = got, want
        assert torch.equal(got_res, want_res)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not torch.isnan(got).any()
    assert (got.double() - want.double()).abs().max().item() <= ulp_tol(dtype, want)


def test_rms_norm_fp32_weight_on_fp16_input_promotes_like_the_reference():
    x = torch.randn(4, 96).half()
    w = torch.randn(96)
    got, want = rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 2 * torch.finfo(torch.float16).eps * want.abs().max()


def test_rms_norm_strided_rows():
    x = torch.randn(6, 2 * 128)[:, ::2]  # last-dim stride 2: copied
    y = torch.randn(128, 6).t()  # rows not contiguous at all
    w = torch.randn(128)
    for inp in (x, y):
        assert torch.allclose(rms_norm(inp, w, 1e-6), reference.rms_norm(inp, w, 1e-6), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 1536, 3001])
def test_swiglu(dtype, n):
    gen = torch.Generator().manual_seed(n)
    gate = (3 * torch.randn(2, n, generator=gen)).to(dtype)
    up = torch.randn(2, n, generator=gen).to(dtype)
    got, want = swiglu(gate, up), reference.swiglu(gate, up)
    assert got.dtype == want.dtype
    assert (got.double() - want.double()).abs().max().item() <= ulp_tol(dtype, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,rot_dim,Hq,Hk", [(64, 64, 9, 3), (128, 128, 32, 8), (128, 64, 4, 4), (80, 80, 17, 1)])
def test_apply_rope(dtype, head_dim, rot_dim, Hq, Hk):
    gen = torch.Generator().manual_seed(head_dim + Hq)
    cache = reference.rope_cos_sin_cache(512, rot_dim, 10000.0, {"rope_type": "llama3", "factor": 8.0,
                                                                  "original_max_position_embeddings": 256})
    B, T = 2, 7
    positions = torch.randint(0, 512, (B, T), generator=gen)
    q = torch.randn(B, T, Hq, head_dim, generator=gen).to(dtype)
    k = torch.randn(B, T, Hk, head_dim, generator=gen).to(dtype)
    q_ref, k_ref = q.clone(), k.clone()
    q_out, k_out = apply_rope(q, k, positions, cache)
    assert q_out is q and k_out is k  # in place
    reference.apply_rope(q_ref, k_ref, positions, cache)
    for got, want in ((q, q_ref), (k, k_ref)):
        assert (got.double() - want.double()).abs().max().item() <= ulp_tol(dtype, want)
        assert torch.equal(got[..., rot_dim:], want[..., rot_dim:])  # the unrotated tail is untouched


def test_apply_rope_on_strided_views_writes_through():
    """q and k as views into one fused qkv projection (the model's layout) are rotated in place."""
    cache = reference.rope_cos_sin_cache(64, 64, 10000.0)
    qkv = torch.randn(3, 5, 4 + 2 + 2, 64)
    q, k = qkv[:, :, :4], qkv[:, :, 4:6]
    head_major = torch.randn(3, 2, 5, 64).transpose(1, 2)  # (3, 5, 2, 64) with no token view: copy + write back
    positions = torch.randint(0, 64, (3, 5))
    for kk in (k, head_major):
        q_ref, k_ref = q.clone(), kk.clone()
        reference.apply_rope(q_ref, k_ref, positions, cache)
        apply_rope(q, kk, positions, cache)
        assert torch.allclose(kk, k_ref, atol=1e-6)
        q.copy_(q_ref)  # undo for the next round
    assert torch.allclose(qkv[:, :, :4], q_ref, atol=1e-6)


def test_ops_triton_backend_routes_elementwise_ops():
    x, w = torch.randn(2, 64), torch.randn(64)
    assert torch.allclose(ops.rms_norm(x, w, 1e-6, backend="triton"), reference.rms_norm(x, w, 1e-6), atol=1e-5)
    assert torch.allclose(ops.swiglu(x, x, backend="triton"), reference.swiglu(x, x), atol=1e-6)


@pytest.mark.parametrize("case", ["rms_weight", "rms_residual", "swiglu_shape", "swiglu_dtype", "rope_positions",
                                  "rope_cache_width", "rope_lead_dims", "rope_float_positions"])
def test_elementwise_reject_bad_input(case):
    x = torch.randn(2, 3, 64)
    q, k = torch.randn(2, 3, 4, 64), torch.randn(2, 3, 2, 64)
    cache = reference.rope_cos_sin_cache(16, 64, 10000.0)
    pos = torch.randint(0, 16, (2, 3))
    with pytest.raises(ValueError):
        if case == "rms_weight":
            rms_norm(x, torch.randn(32), 1e-6)
        elif case == "rms_residual":
            rms_norm(x, torch.randn(64), 1e-6, torch.randn(2, 3, 65))
        elif case == "swiglu_shape":
            swiglu(x, x[..., :32])
        elif case == "swiglu_dtype":
            swiglu(x, x.half())
        elif case == "rope_positions":
            apply_rope(q, k, pos + 16, cache)  # beyond the cos/sin cache (16 rows), whatever randint drew
        elif case == "rope_cache_width":
            apply_rope(q, k, pos, reference.rope_cos_sin_cache(16, 128, 10000.0))
        elif case == "rope_lead_dims":
            apply_rope(q, k[:1], pos, cache)
        elif case == "rope_float_positions":
            apply_rope(q, k, pos.float(), cache)


# ----------------------------------------------------------------------------------------------------
# Outside the interpreter: CPU tensors with backend="triton" are an error, and a top-level `kernels`
# import (repository root on sys.path) defines and imports nothing.

SNIPPET = """
import os, sys, torch
assert "TRITON_INTERPRET" not in os.environ
from llama_fast import ops
from llama_fast.ops import BackendError
from llama_fast.span import SpanBias
q = torch.randn(1, 4, 2, 64)
errors = []
for call in (lambda: ops.span_attention(q, q, q, backend="triton"),
             lambda: __import__("llama_fast.kernels", fromlist=["x"]).span_attention(q, q, q),
             lambda: __import__("llama_fast.kernels", fromlist=["x"]).rms_norm(q, torch.ones(64), 1e-6)):
    try:
        call()
    except BackendError as exc:
        errors.append(str(exc))
assert len(errors) == 3, errors
assert all("CUDA" in e for e in errors), errors
print("ok")
"""


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.pop("PYTHONPATH", None)
    return env


def test_cpu_tensors_with_triton_backend_raise_outside_the_interpreter(tmp_path):
    result = subprocess.run([sys.executable, "-c", SNIPPET], cwd=tmp_path, env=_clean_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_top_level_kernels_module_imports_nothing(tmp_path):
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import kernels; "
            "assert not hasattr(kernels, 'span_attention'), dir(kernels); "
            "assert 'triton' not in sys.modules; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
