"""Triton int8 / int4 weight-only matmuls (kernels/quant_matmul.py) against the dequantized fp64 reference.

Runs the kernels through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on CPU tensors in
fp32 and fp16; bf16 and the compiled kernels are covered by scripts/check_triton_compile.py and
benchmarks/gpu_suite.sh. Outputs and split-K partial sums start NaN-poisoned. Every shape runs twice: on a
pretend GPU of one SM, where K is never split, and on one of 1000 SMs, where K is split as far as allowed.
The bar: every element within c * sum_k |x_k w_k| of the fp64 reference, c = fp16's eps for fp16 outputs
(output rounding plus the int4 weight tile rounded to fp16) and 1e-6 for fp32 (accumulation only).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from llama_fast.kernels import (dequantize_int4, dequantize_int8, int4_matmul, int8_matmul, quantize_int4,
                                quantize_int8)

qm = importlib.import_module("llama_fast.kernels.quant_matmul")

DTYPES = [torch.float32, torch.float16]
# (M, N, K): decode (M = 1, the matrix-vector kernel) and each fp16 GEMM tile (M <= 16, <= 64, > 64; fp32 takes
# the matrix-vector kernel at every M); N and M odd, K below, at and above the K steps, long enough to split.
INT8_SHAPES = [(1, 1, 32), (1, 7, 100), (1, 65, 1040), (3, 7, 96), (5, 3, 100), (3, 65, 256), (17, 9, 1040),
               (70, 5, 64)]
INT4_SHAPES = {32: [(1, 1, 32), (1, 7, 96), (1, 65, 2048), (3, 7, 96), (3, 65, 256), (17, 9, 1024), (70, 5, 64)],
               128: [(1, 1, 128), (1, 7, 384), (1, 65, 2048), (3, 7, 384), (3, 65, 256), (17, 9, 1024),
                     (70, 5, 128)]}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(qm, "POISON", True)


@pytest.fixture(params=[1, 1000], ids=["unsplit", "split"])
def sms(request, monkeypatch):
    monkeypatch.setattr(qm, "_num_sms", lambda device: request.param)
    return request.param


def assert_close(got, x, w64):
    """got (..., N) against x @ w64.T in fp64, elementwise within c * sum_k |x_k w_k| (see the module doc)."""
    x64 = x.double().reshape(-1, x.shape[-1])
    want = (x64 @ w64.T).reshape(got.shape)
    bound = (x64.abs() @ w64.abs().T).reshape(got.shape)
    c = torch.finfo(torch.float16).eps if x.dtype == torch.float16 else 1e-6
    assert got.dtype == x.dtype and not torch.isnan(got).any()
    err = (got.double() - want).abs()
    assert (err <= c * bound + 1e-30).all(), f"max error {err.max().item():.3g}, bound {(c * bound).max().item():.3g}"


def inputs(M, N, K, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen).to(dtype)
    w = torch.randn(N, K, generator=gen) * 0.05 + 0.01 * torch.randn(N, 1, generator=gen)  # rows off zero
    return x, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", INT8_SHAPES)
def test_int8_matmul(dtype, M, N, K, sms):
    x, w = inputs(M, N, K, dtype, seed=M * 1000 + N + K)
    qweight, scales = quantize_int8(w)
    assert_close(int8_matmul(x, qweight, scales), x, dequantize_int8(qweight, scales, torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size,M,N,K", [(g, *s) for g, shapes in INT4_SHAPES.items() for s in shapes])
def test_int4_matmul(dtype, group_size, M, N, K, sms):
    x, w = inputs(M, N, K, dtype, seed=M * 1000 + N + K + group_size)
    packed, scales, zeros = quantize_int4(w, group_size)
    got = int4_matmul(x, packed, scales, zeros, group_size)
    assert_close(got, x, dequantize_int4(packed, scales, zeros, group_size, torch.float64))


def test_split_k_happens_where_the_output_tiles_leave_sms_idle(sms):
    splits, steps = qm._split_k(programs=2, k_steps=64, M=1, row_bytes=4096, device=torch.device("cpu"))
    assert (splits > 1) == (sms == 1000) and splits * steps >= 64 and (splits - 1) * steps < 64
    # at prefill sizes the partial sums would outweigh the weights: no split
    assert qm._split_k(programs=2, k_steps=64, M=512, row_bytes=4096, device=torch.device("cpu"))[0] == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 5])
def test_layouts_leading_dims_and_strides(M, dtype):
    """x with leading dims, strided rows or a non-unit last stride; weights that are the left half of wider
    ones (rows 2K apart); int4 scales and zeros row-major instead of N fastest."""
    gen = torch.Generator().manual_seed(M)
    K, N = 256, 9
    wide = torch.randn(N, 2 * K, generator=gen)
    qweight, scales = quantize_int8(wide)
    qweight = qweight[:, :K]
    packed, s, z = quantize_int4(wide, 32)
    packed, s, z = packed[:, :K // 2], s[:, :K // 32], z[:, :K // 32]
    assert s.stride() == (1, N) and z.stride() == (1, N)  # N fastest
    base = torch.randn(2, M, 2 * K, generator=gen).to(dtype)
    for x in (base[..., :K], base[..., ::2]):  # rows 2K apart; last-dim stride 2 (copied)
        got = int8_matmul(x, qweight, scales)
        assert got.shape == (2, M, N)
        assert_close(got, x, dequantize_int8(qweight, scales, torch.float64))
        got = int4_matmul(x, packed, s.contiguous(), z.contiguous(), 32)
        assert got.shape == (2, M, N)
        assert_close(got, x, dequantize_int4(packed, s, z, 32, torch.float64))


def test_empty_inputs():
    w = torch.randn(5, 64)
    qweight, scales = quantize_int8(w)
    packed, s, z = quantize_int4(w, 32)
    assert int8_matmul(torch.randn(0, 64), qweight, scales).shape == (0, 5)
    assert int4_matmul(torch.randn(2, 0, 64), packed, s, z, 32).shape == (2, 0, 5)
    assert int8_matmul(torch.randn(3, 64), qweight[:0], scales[:0]).shape == (3, 0)


# ----------------------------------------------------------------------------------------------------
# Quantizers


def test_quantize_int8_round_trip():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(33, 200, generator=gen) * torch.rand(33, 1, generator=gen)
    w[3] = 0.0  # an all-zero row
    qweight, scales = quantize_int8(w.bfloat16())  # any floating dtype in
    assert qweight.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (33,)
    assert qweight.abs().max() <= 127 and qweight.abs().amax(1)[scales != 1].min() == 127
    err = (w.bfloat16().double() - dequantize_int8(qweight, scales, torch.float64)).abs()
    assert (err <= scales.double()[:, None] * (0.5 + 1e-5)).all()  # half a step, plus w / scale's fp32 rounding
    assert scales[3] == 1 and (qweight[3] == 0).all()


@pytest.mark.parametrize("group_size", [32, 128])
def test_quantize_int4_round_trip(group_size):
    gen = torch.Generator().manual_seed(group_size)
    w = torch.randn(17, 4 * group_size, generator=gen) * 0.02 + 0.01
    w[2, :group_size] = 0.3  # a constant group
    packed, scales, zeros = quantize_int4(w, group_size)
    n_groups = w.shape[1] // group_size
    assert packed.dtype == torch.uint8 and packed.shape == (17, 2 * group_size) and packed.is_contiguous()
    assert scales.dtype == zeros.dtype == torch.float16 and scales.shape == zeros.shape == (17, n_groups)
    deq = dequantize_int4(packed, scales, zeros, group_size, torch.float64)
    # |error| <= scale / 2, plus the fp16 rounding of the zero (the only error of a constant group)
    s = scales.double().repeat_interleave(group_size, 1)
    z = zeros.double().repeat_interleave(group_size, 1)
    assert ((w.double() - deq).abs() <= s / 2 * (1 + 1e-3) + z.abs() * 2.0 ** -11).all()
    assert (deq[2, :group_size] == zeros[2, 0].double()).all()


@pytest.mark.parametrize("group_size", [32, 128])
def test_quantize_int4_layout(group_size):
    """Weights exactly on the grid (each group spans codes 0..15, scale and zero exact in fp16) come back as
    their own codes, packed as the module doc says: byte i of group g = code i | code i + G/2 << 4."""
    gen = torch.Generator().manual_seed(1)
    N, K, G = 3, 2 * group_size, group_size
    q = torch.randint(0, 16, (N, K), generator=gen)
    q[:, 0::G], q[:, 1::G] = 0, 15  # every group reaches both ends
    scale, zero = 2.0 ** -6, -0.25
    packed, scales, zeros = quantize_int4(q * scale + zero, group_size)
    assert (scales == scale).all() and (zeros == zero).all()
    g, i = torch.arange(K // G)[:, None], torch.arange(G // 2)[None, :]
    expect = q[:, g * G + i] | (q[:, g * G + G // 2 + i] << 4)  # (N, K // G, G // 2)
    assert torch.equal(packed, expect.reshape(N, K // 2).to(torch.uint8))


# ----------------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the argument


def _int8_args():
    w = torch.randn(6, 64)
    return torch.randn(2, 64), *quantize_int8(w)


def _int4_args():
    w = torch.randn(6, 64)
    return torch.randn(2, 64), *quantize_int4(w, 32)


@pytest.mark.parametrize("case,match", [
    ("x_dtype", "x must be"), ("x_k", "qweight must be"), ("qweight_dtype", "qweight must be"),
    ("qweight_stride", "qweight needs a unit stride"), ("scales_shape", "scales must be"),
    ("scales_dtype", "scales must be"), ("devices", "different devices"),
])
def test_int8_matmul_rejects_bad_input(case, match):
    x, qweight, scales = _int8_args()
    with pytest.raises(ValueError, match=match):
        if case == "x_dtype":
            int8_matmul(x.to(torch.int32), qweight, scales)
        elif case == "x_k":
            int8_matmul(torch.randn(2, 65), qweight, scales)
        elif case == "qweight_dtype":
            int8_matmul(x, qweight.to(torch.uint8), scales)
        elif case == "qweight_stride":
            int8_matmul(x, torch.zeros(6, 128, dtype=torch.int8)[:, ::2], scales)
        elif case == "scales_shape":
            int8_matmul(x, qweight, scales[:5])
        elif case == "scales_dtype":
            int8_matmul(x, qweight, scales.half())
        elif case == "devices":
            int8_matmul(x, qweight, scales.to("meta"))


@pytest.mark.parametrize("case,match", [
    ("group_size", "group_size must be one of"), ("k_multiple", "not a multiple of group_size"),
    ("packed_shape", "packed must be"), ("packed_dtype", "packed must be"), ("packed_aligned", "packed must have"),
    ("scales_shape", "scales must be"), ("zeros_dtype", "zeros must be"), ("x_dtype", "x must be"),
])
def test_int4_matmul_rejects_bad_input(case, match):
    x, packed, scales, zeros = _int4_args()
    with pytest.raises(ValueError, match=match):
        if case == "group_size":
            int4_matmul(x, packed, scales, zeros, 64)
        elif case == "k_multiple":
            int4_matmul(torch.randn(2, 48), packed, scales, zeros, 32)
        elif case == "packed_shape":
            int4_matmul(x, packed[:, :16], scales, zeros, 32)
        elif case == "packed_dtype":
            int4_matmul(x, packed.to(torch.int8), scales, zeros, 32)
        elif case == "packed_aligned":  # rows 33 bytes apart: not readable as int32 words
            int4_matmul(x, torch.zeros(6, 33, dtype=torch.uint8)[:, 1:], scales, zeros, 32)
        elif case == "scales_shape":
            int4_matmul(x, packed, scales[:, :1], zeros, 32)
        elif case == "zeros_dtype":
            int4_matmul(x, packed, scales, zeros.float(), 32)
        elif case == "x_dtype":
            int4_matmul(x.double(), packed, scales, zeros, 32)


@pytest.mark.parametrize("case", ["int8_1d", "int8_int", "int4_group", "int4_k", "int4_range"])
def test_quantizers_reject_bad_input(case):
    with pytest.raises(ValueError, match="w must be|group_size|beyond fp16"):
        if case == "int8_1d":
            quantize_int8(torch.randn(64))
        elif case == "int8_int":
            quantize_int8(torch.ones(4, 64, dtype=torch.int32))
        elif case == "int4_group":
            quantize_int4(torch.randn(4, 64), 64)
        elif case == "int4_k":
            quantize_int4(torch.randn(4, 48), 32)
        elif case == "int4_range":
            quantize_int4(torch.full((4, 32), 1e6), 32)
