"""Writing GGUF files: `llama-fast quantize`'s output and the converted checkpoints the loaders cache, with
gguf's own writer. Tensors are produced one at a time, so no more than one converted tensor is in memory,
and written to path + ".part" first: an interrupted write leaves no file at `path`."""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter

# A tensor to write: (name, shape in torch order, storage type name, () -> its bytes as numpy).
TensorSpec = tuple[str, tuple[int, ...], str, Callable[[], np.ndarray]]


def tensor_bytes(shape: tuple[int, ...], kind: str) -> int:
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block * block_bytes)


def write_gguf(path: str, arch: str, metadata: dict[str, tuple[Any, int, int | None]],
               tensors: Iterable[TensorSpec]) -> None:
    """metadata: key -> (value, GGUF value type, item type of an array or None), as GGUFFile.metadata and
    .metadata_types hold them (general.architecture comes from `arch`). Written whole or not at all: into
    path + ".part", renamed over `path` at the end, removed on any failure."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory: name the .gguf file to write")
    if os.path.exists(path) and not os.path.isfile(path):   # a FIFO, a device: renaming over it would replace it
        raise ValueError(f"{path} exists and is not a regular file: name the .gguf file to write")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: the folder {folder} does not exist")
    tensors = list(tensors)
    writer = GGUFWriter(path + ".part", arch)
    try:
        for key, (value, kind, item) in metadata.items():
            if key != "general.architecture":
                writer.add_key_value(key, value, GGUFValueType(kind), None if item is None else GGUFValueType(item))
        for name, shape, kind, _ in tensors:
            nbytes = tensor_bytes(shape, kind)
            writer.add_tensor_info(name, (*shape[:-1], nbytes // max(1, int(np.prod(shape[:-1], dtype=np.int64)))),
                                   np.dtype(np.uint8), nbytes, raw_dtype=GGMLQuantizationType[kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, shape, kind, data in tensors:
            raw = np.ascontiguousarray(data()).view(np.uint8)
            if raw.nbytes != tensor_bytes(shape, kind):
                raise ValueError(f"tensor {name} ({kind}, {shape}) came as {raw.nbytes} bytes, "
                                 f"needs {tensor_bytes(shape, kind)}")
            writer.write_tensor_data(raw)
        writer.close()
        os.replace(path + ".part", path)
    except BaseException:
        writer.close()
        if os.path.exists(path + ".part"):
            os.remove(path + ".part")
        raise
