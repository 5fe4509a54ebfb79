"""Quantized weights in GGUF's block formats, kept as stored: a matrix is its raw blocks (one row of blocks per
output row, as the file holds them) and the C++ kernels multiply them in that form (csrc/core/quant.h), so
decode reads 2-7x fewer bytes per token than from a widened copy.

    w = QuantizedWeight.from_values(np_fp32_matrix, "Q4_0")  # or a view of a GGUF's bytes (loaders)
    y = w.linear(x)                                           # x (..., K) fp32 -> (..., N) fp32
    emb = w.rows(token_ids)                                   # the rows dequantized (an embedding lookup)

Types: Q8_0, Q4_0, Q4_1, Q5_0 (blocks of 32 values) and Q4_K, Q6_K (super-blocks of 256). CUDA has its own
weight-only formats (Int8Weight, Int4Weight: the Triton kernels'). Every kind of packed matrix offers the
same small interface (shape, device, nbytes, linear(x)), which ops.linear and the model's QuantizedLinear
rely on. The numpy
quantizers are gguf's own where it has one (Q8_0, Q4_0, Q4_1, Q5_0) and ours for the K-quants (min/max
per sub-block, then the sub-block scales quantized to 6 bits (Q4_K) or int8 (Q6_K)); the layouts are
ggml's, so llama.cpp reads what these write.
"""
from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

if TYPE_CHECKING:  # torch is imported where it is used: the torch-free fast start reads the tables here
    import torch

QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K")
# The type llama.cpp's quantizer stores a tensor in when its rows are not whole super-blocks of 256.
K_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


def block_size(qtype: str) -> int:
    return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]


def row_bytes(qtype: str, cols: int) -> int:
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return cols // block * nbytes


def block_cols(qtype: str, nbytes: int) -> int:
    """The values in a row of `nbytes` bytes of qtype (the inverse of row_bytes)."""
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return nbytes // block_bytes * block


def storage_type(qtype: str, cols: int) -> str:
    """The type a matrix with rows of `cols` values is stored in when `qtype` is asked for: qtype, or the
    K-quants' fallback where the rows are not whole super-blocks (as llama.cpp's quantizer picks)."""
    if cols % block_size(qtype) == 0:
        return qtype
    fallback = K_FALLBACK.get(qtype)
    if fallback is None or cols % block_size(fallback):
        raise ValueError(f"rows of {cols} values cannot be stored as {qtype} (blocks of {block_size(qtype)})")
    return fallback


def target_type(shape: tuple[int, ...], stored: str, want: str) -> str:
    """The storage type of a tensor of `shape` stored as `stored`, loaded with dtype `want` ("native" or a
    block format name): vectors in F32; matrices as stored (F16 widened to F32) or in the block format."""
    if len(shape) == 1:
        return "F32"
    if want == "native":
        return "F32" if stored == "F16" else stored
    return storage_type(want.upper(), shape[-1])


@dataclass
class QuantizedWeight:
    """A (rows, cols) matrix as raw blocks of `qtype`: data is uint8 (rows, row_bytes(qtype, cols)), often a
    view of a mapped file."""

    data: torch.Tensor
    qtype: str
    shape: tuple[int, int]

    def __post_init__(self):
        import torch

        rows, cols = self.shape
        want = (rows, row_bytes(self.qtype, cols))
        if self.data.dtype != torch.uint8 or tuple(self.data.shape) != want or cols % block_size(self.qtype):
            raise ValueError(f"a {self.qtype} matrix of shape {self.shape} needs uint8 data of shape {want}, got "
                             f"{self.data.dtype} {tuple(self.data.shape)}")

    @classmethod
    def from_values(cls, values: np.ndarray, qtype: str) -> "QuantizedWeight":
        import torch

        values = np.ascontiguousarray(values, dtype=np.float32)
        return cls(torch.from_numpy(quantize(values, qtype)), qtype, tuple(values.shape))

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def part(self, rows=None, cols: range | None = None) -> "QuantizedWeight":
        """Rows `rows` (a slice or an index tensor; None: all) and columns `cols` (None: all) of the matrix,
        a view of its data (strided where columns are cut). Columns are cut between blocks only."""
        data = self.data if rows is None else self.data[rows]
        if cols is None:
            return QuantizedWeight(data, self.qtype, (data.shape[0], self.shape[1]))
        size = block_size(self.qtype)
        if cols.start % size or cols.stop % size:
            raise ValueError(f"a {self.qtype} matrix stores its rows in blocks of {size} values: columns "
                             f"[{cols.start}, {cols.stop}) would cut a block")
        data = data[:, row_bytes(self.qtype, cols.start):row_bytes(self.qtype, cols.stop)]
        return QuantizedWeight(data, self.qtype, (data.shape[0], len(cols)))

    @property
    def device(self) -> torch.device:
        return self.data.device

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., cols) -> x @ W.T (..., rows) in x's dtype, by the C++ kernels (activations quantized per
        block to int8, as llama.cpp multiplies these types)."""
        from ._ext import ext

        rows = x.shape[:-1].numel()
        if rows == 0:
            return x.new_zeros(*x.shape[:-1], self.shape[0])
        out = ext().cpu_matvec(self.data, x.reshape(rows, -1).float().contiguous(), wtype=self.qtype)
        return out.view(*x.shape[:-1], self.shape[0]).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows `ids` (any shape) dequantized: (*ids.shape, cols) fp32."""
        from ._ext import ext

        picked = self.data[ids.reshape(-1)]
        return ext().cpu_dequantize(picked, self.qtype, self.shape[1]).view(*ids.shape, self.shape[1])

    def dequantize(self) -> torch.Tensor:
        import torch

        return torch.from_numpy(dequantize(self.data.numpy(), self.qtype, self.shape))


def dequantize(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> np.ndarray:
    """fp32 values of raw blocks (gguf's reference dequantizers)."""
    return quants.dequantize(np.asarray(raw).reshape(shape[0], -1), GGMLQuantizationType[qtype]).reshape(shape)


def quantize(values: np.ndarray, qtype: str) -> np.ndarray:
    """fp32 (rows, cols) -> uint8 (rows, row_bytes) blocks of qtype; cols a multiple of its block."""
    rows, cols = values.shape
    if cols % block_size(qtype):
        raise ValueError(f"{qtype} needs rows whose length is a multiple of {block_size(qtype)}, got {cols}")
    out = np.empty((rows, row_bytes(qtype, cols)), np.uint8)
    step = max(1, (1 << 20) // cols)  # a slice of rows at a time: the quantizers' temporaries stay small
    for r in range(0, rows, step):
        chunk = values[r:r + step].astype(np.float32)
        if qtype == "Q4_K":
            out[r:r + step] = _quantize_q4_k(chunk).reshape(len(chunk), -1)
        elif qtype == "Q6_K":
            out[r:r + step] = _quantize_q6_k(chunk).reshape(len(chunk), -1)
        else:
            out[r:r + step] = quants.quantize(chunk, GGMLQuantizationType[qtype]).reshape(len(chunk), -1)
    return out


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """(n,) values -> (n, 2) bytes of their fp16."""
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """Q4_K: super-blocks of 8 sub-blocks of 32; x = d * sc_j * q - dmin * m_j, q in [0, 15], sc_j and m_j in
    [0, 63]. Each sub-block takes its min (<= 0) and range; the super-block's d and dmin are the largest
    sub-block scale and offset over 63."""
    x = values.reshape(-1, 8, 32)
    lo = np.minimum(x.min(axis=2), 0.0)                              # (n, 8)
    scale = (x.max(axis=2) - lo) / 15.0
    d = scale.max(axis=1) / 63.0                                     # (n,)
    dmin = (-lo).max(axis=1) / 63.0
    d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(np.divide(scale, d16[:, None], out=np.zeros_like(scale), where=d16[:, None] > 0)), 0, 63)
    m = np.clip(np.rint(np.divide(-lo, dmin16[:, None], out=np.zeros_like(lo), where=dmin16[:, None] > 0)), 0, 63)
    step = (d16[:, None] * sc)[:, :, None]
    offset = (dmin16[:, None] * m)[:, :, None]
    q = np.clip(np.rint(np.divide(x + offset, step, out=np.zeros_like(x), where=step > 0)), 0, 15).astype(np.uint8)
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    scales = np.zeros((len(x), 12), np.uint8)
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    pairs = q.reshape(len(x), 4, 2, 32)  # 64 values per 32 bytes: the first 32 in low nibbles, the next in high
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(len(x), 128)
    return np.concatenate([_fp16_bytes(d16), _fp16_bytes(dmin16), scales, qs], axis=1)


def _quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """Q6_K: super-blocks of 16 sub-blocks of 16; x = d * sc_j * (q - 32), q in [0, 63], sc_j int8. Each
    sub-block's scale is its largest |x| over 32; d is the largest of those over 127."""
    x = values.reshape(-1, 16, 16)
    scale = np.abs(x).max(axis=2) / 32.0                             # (n, 16)
    d16 = (scale.max(axis=1) / 127.0).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(np.divide(scale, d16[:, None], out=np.zeros_like(scale), where=d16[:, None] > 0)), -128, 127)
    step = (d16[:, None] * sc)[:, :, None]
    q = (np.clip(np.rint(np.divide(x, step, out=np.zeros_like(x), where=step > 0)), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(len(x), 2, 4, 32)  # per half of 128: four runs of 32 values
    ql = np.concatenate([q[:, :, 0] & 0xF | ((q[:, :, 2] & 0xF) << 4), q[:, :, 1] & 0xF | ((q[:, :, 3] & 0xF) << 4)],
                        axis=2).reshape(len(x), 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6))
    return np.concatenate([ql, qh.reshape(len(x), 64), sc.astype(np.int8).view(np.uint8), _fp16_bytes(d16)], axis=1)


# ---- CUDA's weight-only formats (kernels/quant_matmul.py): quantized on the device at load, in seconds ----

@dataclass
class Int8Weight:
    """A (rows, cols) matrix as int8 with one fp32 scale per row, multiplied by the Triton int8 kernels."""

    qweight: "torch.Tensor"  # (rows, cols) int8
    scales: "torch.Tensor"   # (rows,) fp32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.qweight.shape)

    @property
    def device(self):
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + 4 * self.scales.numel()

    def linear(self, x):
        from .kernels import int8_matmul

        return int8_matmul(x, self.qweight, self.scales)


@dataclass
class Int4Weight:
    """A (rows, cols) matrix as 4-bit codes with an fp16 scale and zero per group of group_size along each row,
    multiplied by the Triton int4 kernels (layout: kernels/quant_matmul.quantize_int4)."""

    packed: "torch.Tensor"   # (rows, cols // 2) uint8
    scales: "torch.Tensor"   # (rows, cols // group_size) fp16
    zeros: "torch.Tensor"
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], 2 * self.packed.shape[1])

    @property
    def device(self):
        return self.packed.device

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 2 * (self.scales.numel() + self.zeros.numel())

    def linear(self, x):
        from .kernels import int4_matmul

        return int4_matmul(x, self.packed, self.scales, self.zeros, self.group_size)


INT4_GROUP = 128  # int4's group along K: gpt-fast's default for Llama-2-7B (32 costs bytes and speed)


def weight_only(w: "torch.Tensor", kind: str):
    """w (rows, cols), on its device, as CUDA's `kind` ("int8", or "int4" in groups of INT4_GROUP, else 32 where
    the rows are not whole groups of 128)."""
    from .kernels import quantize_int4, quantize_int8

    if kind == "int8":
        return Int8Weight(*quantize_int8(w))
    group = INT4_GROUP if w.shape[1] % INT4_GROUP == 0 else 32
    if w.shape[1] % group:
        raise ValueError(f"int4 needs rows whose length is a multiple of 32, got {w.shape[1]}")
    return Int4Weight(*quantize_int4(w, group), group)
