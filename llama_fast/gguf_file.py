"""A GGUF file read in place: its metadata parsed, its tensors memory-mapped. Torch-free: the engine's
loader (loaders.load_gguf) and the command line's fast start (lite.py) both read GGUFs through it.

The file is mapped copy-on-write (MAP_PRIVATE), so a tensor is a writable view of the page cache: torch
wraps it without a copy and the C++ session reads the same memory; pages are read as they are first
touched, nothing is converted and nothing is written to disk. The one layout change is Q/K's: llama.cpp's
converter interleaves the two halves of each head's rotary pairs, the model (and its RoPE everywhere)
wants them in rotate-half order, so those two tensors per layer are reordered once into private memory
(about 7% of a Llama-3 model's bytes) and their mapped pages are released.

Every problem with the file raises CheckpointError naming the file (and the tensor and its type).
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .config import ModelConfig, check_shapes, naming_the_file
from .mapping import drop_pages
from .paths import CheckpointError
from .quant import QUANT_TYPES, target_type

# Storage types the loaders read: floats, and the block formats the C++ kernels multiply as stored
# (llama_fast.quant; with a float dtype they are dequantised).
FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED_TYPES = FLOAT_TYPES + QUANT_TYPES
_NUMPY_DTYPE = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # (BF16: its bits)

# GGUF tensor names (without blk.N. and .weight) -> the model's (Meta-style) names.
GGUF_NAMES = {
    "token_embd": "tok_embeddings",
    "output_norm": "norm",
    "output": "output",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
}
_MODEL_TO_GGUF = {model: gguf for gguf, model in GGUF_NAMES.items()}
QK_TENSORS = ("attn_q.weight", "attn_k.weight")  # (name endings) the tensors llama.cpp's converter reorders
ROPE_FACTORS = "rope_freqs.weight"  # Llama 3.1's rope scaling, as llama.cpp's converter writes it

_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def interleaved_to_half(w, n_heads: int):
    """Q/K rows from interleaved rotary pairs (Meta, GGUF) to rotate-half order (HF). w: (n_heads*hd, ...),
    a numpy array or a torch tensor."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def half_to_interleaved(w, n_heads: int):
    """The inverse of interleaved_to_half: what llama.cpp's converter does to HF's Q/K rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def model_tensor_name(gguf_name: str, path: str) -> str:
    """blk.3.attn_q.weight -> layers.3.attention.wq.weight (and .bias alike); CheckpointError for a name the
    model lacks."""
    match = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)", gguf_name)
    if match is None or match.group(2) not in GGUF_NAMES:
        raise CheckpointError(f"{path}: unexpected tensor {gguf_name}")
    layer, base, kind = match.groups()
    return (f"layers.{layer}." if layer is not None else "") + GGUF_NAMES[base] + "." + kind


def gguf_tensor_name(name: str) -> str:
    """layers.3.attention.wq.weight -> blk.3.attn_q.weight (and .bias alike: the inverse of model_tensor_name)."""
    base, _, kind = name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{_MODEL_TO_GGUF['.'.join(parts[2:])]}.{kind}"
    return f"{_MODEL_TO_GGUF['.'.join(parts)]}.{kind}"


@dataclass
class GGUFTensor:
    name: str  # as in the file
    type: str  # storage type name ("BF16", "Q4_1", ...)
    shape: tuple[int, ...]  # torch order (outermost first): GGUF's ne=[in, out] is (out, in)
    data: memoryview  # its bytes in the mapped file

    def array(self) -> np.ndarray:
        """A float tensor's values as a numpy view of the mapped bytes (BF16: as uint16 bits)."""
        return np.frombuffer(self.data, dtype=_NUMPY_DTYPE[self.type]).reshape(self.shape)

    def blocks(self) -> np.ndarray:
        """A matrix's bytes as a uint8 numpy view, one row of blocks per row: (rows, bytes per row)."""
        return np.frombuffer(self.data, dtype=np.uint8).reshape(self.shape[0], -1)


class GGUFFile:
    """metadata: key -> python value (arrays as lists); metadata_types: key -> (GGUF value type, item type of
    an array or None), for writing the metadata back as it was; tensors: file name -> GGUFTensor, in file
    order."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                self.opened = os.fstat(f.fileno())   # the file mapped, whatever is at `path` later
        except (OSError, ValueError) as err:  # (ValueError: an empty file cannot be mapped)
            raise CheckpointError(f"{path}: cannot map the file ({err})") from err
        self._pos = 0
        try:
            self.metadata, self.metadata_types, infos, data_start = self._parse_header()
        except (struct.error, UnicodeDecodeError, OverflowError, MemoryError) as err:
            raise CheckpointError(f"{path}: not a readable GGUF file (header cut short or corrupt: {err})") from err
        self.tensors = self._check_tensors(infos, data_start)

    # ---- header ----
    def _read(self, fmt: str):
        value = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return value[0]

    def _string(self) -> str:
        n = self._read("<Q")
        if self._pos + n > len(self._map):
            raise struct.error(f"a string of {n} bytes at byte {self._pos} runs past the end of the file")
        text = self._map[self._pos:self._pos + n].decode("utf-8")
        self._pos += n
        return text

    def _value(self, kind: int):
        if kind in _SCALARS:
            return self._read(_SCALARS[kind])
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._read("<I"), self._read("<Q")
            if item in _SCALARS:  # numbers: one unpack for the whole array
                fmt = f"<{count}{_SCALARS[item][1]}"
                values = list(struct.unpack_from(fmt, self._map, self._pos))
                self._pos += struct.calcsize(fmt)
                return values
            return [self._value(item) for _ in range(count)]
        raise struct.error(f"unknown metadata value type {kind} at byte {self._pos}")

    def _parse_header(self):
        if self._map[:4] != _MAGIC:
            raise CheckpointError(f"{self.path}: not a GGUF file (it starts with {bytes(self._map[:4])!r})")
        self._pos = 4
        version, n_tensors, n_kv = self._read("<I"), self._read("<Q"), self._read("<Q")
        if version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {version} is not supported (2, 3)")
        metadata, types = {}, {}
        for _ in range(n_kv):
            key = self._string()
            kind = self._read("<I")
            types[key] = (kind, struct.unpack_from("<I", self._map, self._pos)[0] if kind == _ARRAY else None)
            metadata[key] = self._value(kind)
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._read("<Q") for _ in range(self._read("<I"))]
            infos.append((name, dims, self._read("<I"), self._read("<Q")))
        alignment = metadata.get("general.alignment", 32)
        # As llama.cpp: the data section starts at the next multiple of a power of two.
        if (isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1
                or alignment.bit_count() != 1):
            raise CheckpointError(f"{self.path}: general.alignment must be a power of two, got {alignment!r}")
        return metadata, types, infos, -(-self._pos // alignment) * alignment

    # ---- tensors ----
    def _check_tensors(self, infos, data_start: int) -> dict[str, GGUFTensor]:
        """Each tensor's bytes, checked: a known type, whole blocks, inside the file, not overlapping the next."""
        spans, seen = [], set()
        for name, dims, type_id, offset in infos:
            if name in seen:  # (llama.cpp refuses such a file too)
                raise CheckpointError(f"{self.path}: tensor {name} is in the file twice")
            seen.add(name)
            try:
                kind = GGMLQuantizationType(type_id).name
            except ValueError:
                raise CheckpointError(f"{self.path}: tensor {name} has unknown type id {type_id}") from None
            if kind not in SUPPORTED_TYPES:
                raise CheckpointError(f"{self.path}: tensor {name} has type {kind}, supported: {', '.join(SUPPORTED_TYPES)}")
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
            if not dims or dims[0] % block:  # (a K-quant's block is its super-block of 256)
                raise CheckpointError(f"{self.path}: tensor {name} of type {kind} has rows of {dims[:1]} values, "
                                      f"not a multiple of its block of {block}")
            nbytes = math.prod(dims) // block * block_bytes  # (Python ints: a 64-bit product could wrap)
            spans.append((data_start + offset, nbytes, name, kind, tuple(reversed(dims))))
        spans.sort()
        ends = [start for start, *_ in spans[1:]] + [len(self._map)]
        tensors = {}
        for (start, nbytes, name, kind, shape), end in zip(spans, ends):
            if start + nbytes > end:
                what = "the end of the file" if end == len(self._map) else "the next tensor's data"
                raise CheckpointError(f"{self.path}: tensor {name} of type {kind} and shape {shape} needs {nbytes} "
                                      f"bytes, {max(end - start, 0)} are there before {what}")
            tensors[name] = GGUFTensor(name, kind, shape, memoryview(self._map)[start:start + nbytes])
        return {name: tensors[name] for name, *_ in infos}

    def release(self, tensor: GGUFTensor) -> None:
        """Drops the pages of `tensor`'s bytes from this process (a copy of it is used instead): they stop
        counting in its memory, and the page cache keeps them for whoever reads the file."""
        drop_pages(_address(tensor.data), len(tensor.data))

    @property
    def size(self) -> int:
        return len(self._map)


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def model_tensors(gguf: GGUFFile) -> dict[str, GGUFTensor]:
    """The model's tensors in the file, by their model names (Llama 3.1's rope_freqs goes into the config)."""
    return {model_tensor_name(t.name, gguf.path): t for t in gguf.tensors.values() if t.name != ROPE_FACTORS}


def stored_types(gguf: GGUFFile) -> dict[str, tuple[tuple[int, ...], str]]:
    """GGUF name -> (shape, storage type) of each tensor as the file stores it (what block_targets says it
    should be, for a converted copy in the cache)."""
    return {t.name: (tuple(t.shape), t.type) for t in gguf.tensors.values()}


def block_targets(gguf: GGUFFile, want: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """GGUF name -> (shape, storage type) of each tensor when the file is loaded with dtype `want` (a block
    format or "native"): quant.target_type's, but the rope factors, which stay as stored."""
    return {t.name: (tuple(t.shape), t.type if t.name == ROPE_FACTORS else target_type(t.shape, t.type, want))
            for t in gguf.tensors.values()}


def gguf_config(gguf: GGUFFile) -> ModelConfig:
    """The file's ModelConfig: its metadata, and Llama 3.1's per-frequency RoPE divisors (the rope_freqs
    tensor) where it has them. The tensors' shapes (in the file's header) are checked against it before any
    is read: Q/K rows are reordered by a head count that must fit them."""
    with naming_the_file(gguf.path):
        config = ModelConfig.from_gguf(gguf.metadata)
    config.tie_embeddings = "output.weight" not in gguf.tensors
    check_shapes(model_tensors(gguf), config, gguf.path)
    factors = gguf.tensors.get(ROPE_FACTORS)
    if factors is not None:
        if factors.type != "F32" or factors.shape != (config.head_dim // 2,):
            raise CheckpointError(f"{gguf.path}: tensor {ROPE_FACTORS} has type {factors.type} and shape "
                                  f"{factors.shape}, expected F32 and ({config.head_dim // 2},)")
        config.rope_scaling = {"rope_type": "freq_factors", "factors": factors.array().astype(float).tolist()}
    return config


def mapped_weights(gguf: GGUFFile, n_heads: int, n_kv_heads: int, progress: bool) -> dict[str, tuple[np.ndarray, str]]:
    """model name -> (numpy array, storage type) of every tensor: views of the mapped file (float tensors as
    their values, BF16 as uint16 bits; block formats as their bytes, one row of blocks per row), but Q and K,
    reordered once to rotate-half rows (their mapped pages then released)."""
    from tqdm import tqdm

    def array(t: GGUFTensor) -> np.ndarray:
        return t.array() if t.type in FLOAT_TYPES else t.blocks()

    weights = {}
    qk = [t for t in gguf.tensors.values() if t.name.endswith(QK_TENSORS)]
    for t in gguf.tensors.values():
        if t.name != ROPE_FACTORS and not t.name.endswith(QK_TENSORS):
            weights[model_tensor_name(t.name, gguf.path)] = (array(t), t.type)
    for t in tqdm(qk, desc="reordering Q/K rows for RoPE", unit="tensor", leave=False, disable=not progress):
        heads = n_heads if t.name.endswith("attn_q.weight") else n_kv_heads
        weights[model_tensor_name(t.name, gguf.path)] = (np.ascontiguousarray(interleaved_to_half(array(t), heads)), t.type)
        gguf.release(t)
    return weights
