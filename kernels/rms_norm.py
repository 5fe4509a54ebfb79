"""Fused RMSNorm (optionally with the residual add), one program per row, statistics in fp32."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device


@triton.jit
def _rms_norm_kernel(X, R, W, Y, NEW_R, stride_x, stride_r, stride_y, stride_nr, N, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # x + residual rounded to the input dtype first, exactly as the reference adds them
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(NEW_R + row * stride_nr + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)  # the reference rounds to x's dtype before the weight
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * normed).to(Y.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, n) view with a unit last stride (copy only if no such view exists)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    try:
        return t.view(-1, n)
    except RuntimeError:
        return t.reshape(-1, n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm: weight * (x / sqrt(mean(x^2) + eps)), as llama_fast.reference.rms_norm.

    x: (..., N) fp16/bf16/fp32; weight: (N,); residual: optional, same shape and dtype as x.
    Returns y (..., N) in the promoted dtype of (weight, x); with residual, (y, x + residual) where the
    sum (the new residual, dtype of x) is what was normalised.
    """
    op = "rms_norm"
    check_device(op, x, weight, residual)
    N = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != N:
        raise ValueError(f"{op}: weight must be ({N},), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"{op}: residual {residual.dtype} {tuple(residual.shape)} must match x "
                         f"{x.dtype} {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{op}: x must be floating point, got {x.dtype}")
    out_dtype = torch.result_type(weight, x)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    new_r = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if x.numel() == 0:
        return (y, new_r) if residual is not None else y
    x2 = _rows(x, N)
    r2 = _rows(residual, N) if residual is not None else x2
    y2, nr2 = y.view(-1, N), (new_r.view(-1, N) if new_r is not None else y.view(-1, N))
    weight = weight.contiguous()
    block = triton.next_power_of_2(N)
    num_warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, y2, nr2, x2.stride(0), r2.stride(0), y2.stride(0), nr2.stride(0), N, float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
    )
    return (y, new_r) if residual is not None else y
