"""Weight-only quantized matmuls: y = x @ W.T with W stored as int8 (per output channel) or int4 (per group).

Quantizers and plain-torch dequantizers run anywhere; the Triton kernels take fp16 / bf16 / fp32
activations, dequantize weight tiles in registers and accumulate in fp32.

int8: qweight (N, K) int8, scales (N,) fp32, W = qweight * scales[:, None] (symmetric, per row).
int4: asymmetric per group of G = 32 or 128 weights along K, W = q * scale + zero with codes q in [0, 15]
  ("zero" is the weight that code 0 stands for: the group minimum). Two codes per byte, packed so that the
  kernels never interleave nibbles: byte i of group g of row n holds code i of the group in its low nibble
  and code i + G/2 in its high nibble,
      packed[n, g * G/2 + i] = q[n, g * G + i] | q[n, g * G + G/2 + i] << 4    (0 <= i < G/2).
  So the low nibbles of a group multiply x[g*G : g*G + G/2] and the high ones x[g*G + G/2 : (g+1)*G]:
  two contiguous halves, each a plain tl.dot operand, with one scale and zero per group and row.
  scales and zeros are (N, K // G) fp16 (a quarter of the packed bytes at G = 32), laid out with N
  fastest (transposed views of contiguous (K // G, N) tensors) so that one group's values for a tile of
  rows are one contiguous load; the kernels take any strides.

Two kernels per format (int8_matmul / int4_matmul pick):
  M = 1 (decode): matrix-vector, BLOCK_N rows of W per program streamed along K with software-pipelined
    loads, products kept per lane and reduced once at the end. The int4 one reads the packed bytes as
    int32 words and masks each nibble in place (x takes the power of two), so a weight costs about three
    instructions: mask, convert, FMA. fp32 activations take these kernels at any M, one row of x per
    program: fp32 tl.dot tiles (exact, not TF32) spill registers.
  M > 1, fp16 / bf16 (batched decode, prefill): tl.dot tiles of BLOCK_M x BLOCK_N with the weight tile
    converted to x's dtype (exact for int8; int4 rounds q * scale + zero once, as a dequantized weight
    would be).
  Both split K across programs when the output tiles alone leave SMs idle: each split writes fp32 partial
  sums, added up by one torch.sum. Codes become floats through the mantissa of 2^23, not I2F (see Kernels).

Sizes: any M and N (masked); int8 any K (masked; full-width loads when K % 16 == 0); int4 K a multiple
of the group size.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, check_device, last_dim_contiguous
from .decode_attention import _num_sms

GROUP_SIZES = (32, 128)
MAX_SPLITS = 16
POISON = False  # tests set it: outputs and split-K partial sums start NaN-filled, so an unwritten one shows

# Matrix-vector: 16 rows x 512 weight bytes per step (BLOCK_K codes; int4: 1024 codes), 3 steps in flight.
# 16 rows share each converted x; the int4 kernel then needs about 4.5 instructions per weight (sm_90).
GEMV_INT8 = dict(BLOCK_N=16, BLOCK_K=512, STAGES=3, num_warps=4)
GEMV_INT4 = dict(BLOCK_N=16, BLOCK_K=1024, STAGES=3, num_warps=4)


def gemm_config(M: int) -> dict:
    """Tile for M > 1 rows (the compile check builds each of these). int4 steps one group along K instead of
    BLOCK_K. A decode batch (<= 16 rows) reads each weight tile once for all its rows; 64-column tiles keep
    enough programs to fill the GPU at prefill sizes."""
    if M <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3)


# ----------------------------------------------------------------------------------------------------
# Quantizers and reference dequantizers (plain torch)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w (N, K) float -> (qweight (N, K) int8 in [-127, 127], scales (N,) fp32).

    |w - qweight * scales[:, None]| <= scales / 2 elementwise (up to the fp32 rounding of w / scale); an
    all-zero row gets scale 1 and codes 0.
    """
    _check_weight_to_quantize("quantize_int8", w)
    wf = w.detach().float()
    scales = wf.abs().amax(1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(wf / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) weights in `dtype` from quantize_int8's output."""
    return qweight.to(dtype) * scales.to(dtype)[:, None]


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` (32 or 128) along K: w (N, K) float ->
    (packed (N, K // 2) uint8, scales (N, K // G) fp16, zeros (N, K // G) fp16), layout in the module doc.

    scale = (max - min) / 15 and zero = min of each group, both rounded to fp16 before the codes are chosen,
    so |w - (q * scale + zero)| <= scale / 2 up to that rounding (a constant group is exact but for it).
    """
    op = "quantize_int4"
    _check_weight_to_quantize(op, w)
    N, K = w.shape
    _check_group(op, group_size, K)
    groups = w.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = groups.amin(2), groups.amax(2)
    scales = ((hi - lo) / 15.0).half()
    zeros = lo.half()
    if not (torch.isfinite(scales).all() and torch.isfinite(zeros).all()):
        raise ValueError(f"{op}: w has values or group ranges beyond fp16 (max {torch.finfo(torch.float16).max})")
    s = scales.float()[..., None]
    q = torch.round((groups - zeros.float()[..., None]) / torch.where(s > 0, s, torch.ones_like(s)))
    q = q.clamp_(0, 15).to(torch.uint8)
    half = group_size // 2
    packed = (q[..., :half] | (q[..., half:] << 4)).reshape(N, K // 2)
    return packed, _n_fastest(scales), _n_fastest(zeros)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) weights in `dtype` from quantize_int4's output."""
    N = packed.shape[0]
    p = packed.reshape(N, -1, group_size // 2)
    q = torch.cat([p & 15, p >> 4], dim=2).to(dtype)  # (N, K // G, G)
    return (q * scales.to(dtype)[..., None] + zeros.to(dtype)[..., None]).reshape(N, -1)


def _n_fastest(t: torch.Tensor) -> torch.Tensor:
    """(N, G) values stored with N fastest: a transposed view of a contiguous (G, N) tensor."""
    return t.t().contiguous().t()


def _check_weight_to_quantize(op: str, w: torch.Tensor) -> None:
    if w.dim() != 2 or not w.dtype.is_floating_point:
        raise ValueError(f"{op}: w must be a 2-D (N, K) floating tensor, got {w.dtype} {tuple(w.shape)}")


def _check_group(op: str, group_size: int, K: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{op}: group_size must be one of {GROUP_SIZES}, got {group_size}")
    if K % group_size:
        raise ValueError(f"{op}: K = {K} is not a multiple of group_size {group_size}")


# ----------------------------------------------------------------------------------------------------
# Kernels
#
# Codes become floats through the mantissa of 2^23 (bit pattern 0x4B000000): for 0 <= v < 2^23 the bits
# 0x4B000000 | v read as a float are exactly 2^23 + v, so v costs one integer op and one float add, where
# a plain int-to-float convert (I2F) runs at a quarter of the FMA rate and would bound the kernels.

TWO_POW_23 = 0x4B000000  # the bit pattern of 2^23 as a float


@triton.jit
def _int8_to_float(q):
    """fp32 of int8 codes: code + 128 (in [0, 256)) added into the mantissa of 2^23."""
    return (q.to(tl.int32) + (0x4B000000 + 128)).to(tl.float32, bitcast=True) - (8388608.0 + 128.0)


@triton.jit
def _bits_to_float(bits, two_pow_23):
    """fp32 of int32 bits in [0, 2^23), from or-ing them into the mantissa of 2^23. two_pow_23 is TWO_POW_23
    passed as a kernel argument: from a register ptxas fuses the mask that extracted the bits and this or
    into one LOP3, where with two immediates it emits two."""
    return (bits | two_pow_23).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _store(acc, Y, P, offs_m, offs_n, M, N, split, SPLIT: tl.constexpr):
    """acc (BM, BN) fp32 into Y (M, N, contiguous) in Y's dtype, or with split K into P[split] (fp32)."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if SPLIT:
        tl.store(P + split.to(tl.int64) * M * N + offs, acc, mask=mask)
    else:
        tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _int8_gemv_kernel(X, W, S, Y, P, M, N, K, stride_xm, stride_wn, k_per_split,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, SPLIT: tl.constexpr):
    row = tl.program_id(0)  # of x; fastest, so that the rows sharing a weight tile run together
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    X += row.to(tl.int64) * stride_xm
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)  # per-lane partial sums: one cross-lane reduction, at the end
    k_start = split * k_per_split
    for k in tl.range(k_start, tl.minimum(K, k_start + k_per_split), BLOCK_K, num_stages=STAGES):
        k_mask = k + offs_k < K
        x = tl.load(X + k + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        q = tl.load(w_ptrs + k, mask=n_mask[:, None] & k_mask[None, :], other=0)
        acc += _int8_to_float(q) * x[None, :]
    y = tl.sum(acc, 1) * tl.load(S + offs_n, mask=n_mask, other=0.0)
    _store(y[None, :], Y, P, row + tl.arange(0, 1), offs_n, M, N, split, SPLIT)


@triton.jit
def _int4_gemv_kernel(X, W, S, Z, Y, P, M, N, n_groups, stride_xm, stride_wn, stride_sn, stride_sg, stride_zn,
                      stride_zg, groups_per_split, two_pow_23, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_G: tl.constexpr, STAGES: tl.constexpr, SPLIT: tl.constexpr):
    """W: the packed bytes read as int32 words (K // 8 per row). Word c of a group holds its bytes 4c..4c+3:
    the low nibble of byte j is code 4c + j of the group, the high nibble code G/2 + 4c + j."""
    HALF: tl.constexpr = GROUP // 2
    WORDS: tl.constexpr = GROUP // 8
    row = tl.program_id(0)  # of x; fastest, so that the rows sharing a weight tile run together
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    X += row.to(tl.int64) * stride_xm
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, BLOCK_G)
    offs_c = tl.arange(0, WORDS)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)
    # (BLOCK_N, BLOCK_G, WORDS): BLOCK_G whole groups of BLOCK_N rows, contiguous along the last two dims
    w_ptrs = W + rows[:, None, None] * stride_wn + offs_g[None, :, None] * WORDS + offs_c[None, None, :]
    x_ptrs = X + offs_g[:, None] * GROUP + 4 * offs_c[None, :]  # x of code 4c of each group
    s_ptrs = S + rows[:, None] * stride_sn + offs_g[None, :] * stride_sg
    z_ptrs = Z + rows[:, None] * stride_zn + offs_g[None, :] * stride_zg
    acc = tl.zeros((BLOCK_N, BLOCK_G), tl.float32)
    g_start = split * groups_per_split
    for g in tl.range(g_start, tl.minimum(n_groups, g_start + groups_per_split), BLOCK_G, num_stages=STAGES):
        g_mask = g + offs_g < n_groups
        w = tl.load(w_ptrs + g * WORDS, mask=n_mask[:, None, None] & g_mask[None, :, None], other=0)
        qx = tl.zeros((BLOCK_N, BLOCK_G, WORDS), tl.float32)
        sx = tl.zeros((BLOCK_G, WORDS), tl.float32)
        for t in tl.static_range(8):  # nibble t of each word: bits 4t..4t+3, of byte t // 2
            # Each nibble is masked in place, so it reads as code * 2^bit; its x takes the 2^-bit (exact).
            # The mantissa holds bits 0..22: the nibbles at bits 20..31 are shifted down by 16 first.
            shift = 16 if t >= 5 else 0
            bit = 4 * t - shift
            x = tl.load(x_ptrs + g * GROUP + (t // 2) + (t % 2) * HALF, mask=g_mask[:, None], other=0.0)
            x = x.to(tl.float32)
            sx += x
            q = _bits_to_float((w >> shift) & (0xF << bit), two_pow_23)
            qx += q * (x * (1.0 / (1 << bit)))[None, :, :]
        sz_mask = n_mask[:, None] & g_mask[None, :]
        s = tl.load(s_ptrs + g * stride_sg, mask=sz_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptrs + g * stride_zg, mask=sz_mask, other=0.0).to(tl.float32)
        # within a group w = q * scale + zero, so its dot with x is scale * (q . x) + zero * sum(x)
        acc += s * tl.sum(qx, 2) + z * tl.sum(sx, 1)[None, :]
    _store(tl.sum(acc, 1)[None, :], Y, P, row + tl.arange(0, 1), offs_n, M, N, split, SPLIT)


@triton.jit
def _int8_gemm_kernel(X, W, S, Y, P, M, N, K, stride_xm, stride_wn, k_per_split,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    pid_m = tl.program_id(0)  # fastest: the programs sharing a weight tile run together
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = W + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # (BLOCK_K, BLOCK_N) tile of W.T
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    k_start = split * k_per_split
    for k in range(k_start, tl.minimum(K, k_start + k_per_split), BLOCK_K):
        k_mask = k + offs_k < K
        x = tl.load(x_ptrs + k, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = tl.load(w_ptrs + k, mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc = tl.dot(x, _int8_to_float(q).to(x.dtype), acc)  # exact in fp16/bf16
    acc *= tl.load(S + offs_n, mask=n_mask, other=0.0)[None, :]
    _store(acc, Y, P, offs_m, offs_n, M, N, split, SPLIT)


@triton.jit
def _int4_gemm_kernel(X, W, S, Z, Y, P, M, N, n_groups, stride_xm, stride_wn, stride_sn, stride_sg, stride_zn,
                      stride_zg, groups_per_split, two_pow_23, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    HALF: tl.constexpr = GROUP // 2
    pid_m = tl.program_id(0)  # fastest: the programs sharing a weight tile run together
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, HALF)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_c[None, :]  # a group's low half; + HALF: high
    w_ptrs = W + offs_n[None, :].to(tl.int64) * stride_wn + offs_c[:, None]  # (HALF, BLOCK_N) bytes of a group
    s_ptrs = S + offs_n * stride_sn
    z_ptrs = Z + offs_n * stride_zn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    g_start = split * groups_per_split
    for g in range(g_start, tl.minimum(n_groups, g_start + groups_per_split)):  # one group per step
        x_lo = tl.load(x_ptrs + g * GROUP, mask=m_mask[:, None], other=0.0)
        x_hi = tl.load(x_ptrs + g * GROUP + HALF, mask=m_mask[:, None], other=0.0)
        p = tl.load(w_ptrs + g * HALF, mask=n_mask[None, :], other=0).to(tl.int32)
        s = tl.load(s_ptrs + g * stride_sg, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        z = tl.load(z_ptrs + g * stride_zg, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        # the high nibble is masked in place (16 x code, no shift) and its scale takes the 1/16
        w_lo = (_bits_to_float(p & 0xF, two_pow_23) * s + z).to(x_lo.dtype)
        w_hi = (_bits_to_float(p & 0xF0, two_pow_23) * (s * 0.0625) + z).to(x_lo.dtype)
        acc = tl.dot(x_lo, w_lo, acc)
        acc = tl.dot(x_hi, w_hi, acc)
    _store(acc, Y, P, offs_m, offs_n, M, N, split, SPLIT)


# ----------------------------------------------------------------------------------------------------
# Wrappers


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (qweight * scales[:, None]).T, accumulated in fp32.

    x: (..., K) fp16 / bf16 / fp32; qweight: (N, K) int8 with a unit stride along K; scales: (N,) fp32
    (quantize_int8's output). Returns (..., N) in x's dtype, freshly allocated.
    """
    op = "int8_matmul"
    check_device(op, x, qweight, scales)
    x2 = _flat_x(op, x)
    M, K = x2.shape
    _check_weight(op, "qweight", qweight, torch.int8, K, K)
    N = qweight.shape[0]
    _check_like(op, "scales", scales, torch.float32, (N,))
    if M == 0 or N == 0:
        return x.new_zeros(*x.shape[:-1], N)
    if _matrix_vector(M, x):
        cfg = GEMV_INT8
        n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
        splits, steps = _split_k(n_blocks * M, triton.cdiv(K, cfg["BLOCK_K"]), M, K, x.device)
        out = _output(M, N, splits, x)
        _int8_gemv_kernel[(M, n_blocks, splits)](
            x2, qweight, scales, out, out, M, N, K, x2.stride(0), qweight.stride(0), steps * cfg["BLOCK_K"],
            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], STAGES=cfg["STAGES"], SPLIT=splits > 1,
            num_warps=cfg["num_warps"])
    else:
        cfg = gemm_config(M)
        m_blocks, n_blocks = triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"])
        splits, steps = _split_k(m_blocks * n_blocks, triton.cdiv(K, cfg["BLOCK_K"]), M, K, x.device)
        out = _output(M, N, splits, x)
        _int8_gemm_kernel[(m_blocks, n_blocks, splits)](
            x2, qweight, scales, out, out, M, N, K, x2.stride(0), qweight.stride(0), steps * cfg["BLOCK_K"],
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT=splits > 1,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return _finish(out, splits, x, N)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x @ W.T with W = dequantize_int4(packed, scales, zeros, group_size), accumulated in fp32.

    x: (..., K) fp16 / bf16 / fp32, K a multiple of group_size (32 or 128); packed: (N, K // 2) uint8 with a
    unit stride along K; scales, zeros: (N, K // group_size) fp16, any strides (quantize_int4's output).
    Returns (..., N) in x's dtype, freshly allocated.
    """
    op = "int4_matmul"
    check_device(op, x, packed, scales, zeros)
    x2 = _flat_x(op, x)
    M, K = x2.shape
    _check_group(op, group_size, K)
    _check_weight(op, "packed", packed, torch.uint8, K // 2, K)
    words = _words(op, "packed", packed)
    N, n_groups = packed.shape[0], K // group_size
    _check_like(op, "scales", scales, torch.float16, (N, n_groups))
    _check_like(op, "zeros", zeros, torch.float16, (N, n_groups))
    if M == 0 or N == 0:
        return x.new_zeros(*x.shape[:-1], N)
    sz_strides = (*scales.stride(), *zeros.stride())
    if _matrix_vector(M, x):
        cfg = GEMV_INT4
        block_g = cfg["BLOCK_K"] // group_size
        n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
        splits, steps = _split_k(n_blocks * M, triton.cdiv(n_groups, block_g), M, K // 2, x.device)
        out = _output(M, N, splits, x)
        _int4_gemv_kernel[(M, n_blocks, splits)](
            x2, words, scales, zeros, out, out, M, N, n_groups, x2.stride(0), words.stride(0), *sz_strides,
            steps * block_g, TWO_POW_23, GROUP=group_size, BLOCK_N=cfg["BLOCK_N"], BLOCK_G=block_g,
            STAGES=cfg["STAGES"], SPLIT=splits > 1, num_warps=cfg["num_warps"])
    else:
        cfg = gemm_config(M)
        m_blocks, n_blocks = triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"])
        splits, steps = _split_k(m_blocks * n_blocks, n_groups, M, K // 2, x.device)
        out = _output(M, N, splits, x)
        _int4_gemm_kernel[(m_blocks, n_blocks, splits)](
            x2, packed, scales, zeros, out, out, M, N, n_groups, x2.stride(0), packed.stride(0), *sz_strides,
            steps, TWO_POW_23, GROUP=group_size, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], SPLIT=splits > 1,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return _finish(out, splits, x, N)


def _split_k(programs: int, k_steps: int, M: int, row_bytes: int, device: torch.device) -> tuple[int, int]:
    """(splits, K steps per split). K is split only when the output tiles alone leave SMs idle: then into
    enough programs for about two waves, each split at least 2 steps long, and few enough that the fp32
    partial sums (written and read again, 8 bytes per row per split) stay under half the weight bytes
    (row_bytes per output channel). No split is left empty."""
    sms = _num_sms(device)
    if programs >= sms:
        return 1, k_steps
    splits = min(triton.cdiv(2 * sms, programs), k_steps // 2, row_bytes // (16 * M), MAX_SPLITS)
    steps = triton.cdiv(k_steps, max(1, splits))
    return triton.cdiv(k_steps, steps), steps


def _output(M: int, N: int, splits: int, x: torch.Tensor) -> torch.Tensor:
    """What the kernel writes: y (M, N) in x's dtype, or with split K the fp32 partial sums (splits, M, N).
    It goes in as both the Y and P arguments; the kernel's SPLIT flag picks the one it stores to."""
    if splits == 1:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
    if POISON:
        out.fill_(float("nan"))
    return out


def _finish(out: torch.Tensor, splits: int, x: torch.Tensor, N: int) -> torch.Tensor:
    y = out.sum(0).to(x.dtype) if splits > 1 else out
    return y.view(*x.shape[:-1], N)


def _matrix_vector(M: int, x: torch.Tensor) -> bool:
    """Whether the matrix-vector kernels take this call: decode (one row), and fp32 at any M (module doc)."""
    return M == 1 or x.dtype == torch.float32


def _flat_x(op: str, x: torch.Tensor) -> torch.Tensor:
    """x as (M, K) rows with a unit stride along K (a copy only when no such view exists)."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: x must be fp16, bf16 or fp32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must be (..., K) with K >= 1, got {tuple(x.shape)}")
    return last_dim_contiguous(x.reshape(-1, x.shape[-1]))


def _check_weight(op: str, name: str, w: torch.Tensor, dtype: torch.dtype, cols: int, K: int) -> None:
    if w.dtype != dtype or w.dim() != 2 or w.shape[1] != cols:
        raise ValueError(f"{op}: {name} must be (N, {cols}) {dtype} for x with K = {K}, got {w.dtype} "
                         f"{tuple(w.shape)}")
    if w.stride(1) != 1 and cols > 1:
        raise ValueError(f"{op}: {name} needs a unit stride along K (got strides {w.stride()}); "
                         "weights are not copied behind your back")


def _words(op: str, name: str, w: torch.Tensor) -> torch.Tensor:
    """w's bytes read four at a time as int32 words (the int4 matrix-vector kernel loads whole words)."""
    try:
        return w.view(torch.int32)
    except RuntimeError as exc:
        raise ValueError(f"{op}: {name} must have 4-byte aligned rows to be read as int32 words: {exc}") from None


def _check_like(op: str, name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(f"{op}: {name} must be {shape} {dtype}, got {tuple(t.shape)} {t.dtype}")
