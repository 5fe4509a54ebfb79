"""Fused SwiGLU: silu(gate) * up, elementwise, math in fp32 with the reference's rounding."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device

BLOCK = 1024


@triton.jit
def _swiglu_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0)
    u = tl.load(U + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    silu = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # F.silu rounds to the input dtype
    tl.store(Y + offs, (silu.to(tl.float32) * u.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up. gate, up: (..., ffn_dim), same shape and dtype. Returns (..., ffn_dim) new tensor."""
    op = "swiglu"
    check_device(op, gate, up)
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if gate.dtype != up.dtype or not gate.dtype.is_floating_point:
        raise ValueError(f"{op}: gate and up must share one floating dtype, got {gate.dtype} and {up.dtype}")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=4)
    return out
