"""Checkpoint loaders: GGUF files, Hugging Face directories and Meta directories -> Checkpoint.

Every loader returns weights under the model's (Meta-style) names with Q/K rows in rotate-half order,
a ModelConfig and a Tokenizer. Bad files raise CheckpointError naming the file and the problem.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .config import ModelConfig, check_shapes, naming_the_file
from .gguf_file import (FLOAT_TYPES, QK_TENSORS, GGUFFile, GGUFTensor, block_targets, gguf_tensor_name, mapped_weights,
                        gguf_config, half_to_interleaved, interleaved_to_half, model_tensors, stored_types)
from .gguf_write import TensorSpec, write_gguf
from .mapping import FileMappings
from .quant import QUANT_TYPES, QuantizedWeight, block_cols, dequantize, quantize, target_type
from .paths import DEFAULT_MODEL, CheckpointError, resolve_model_path  # noqa: F401 (DEFAULT_MODEL: re-exported)
from .paths import check_unchanged, complete_entry, gguf_cache_entry, gguf_cache_path, write_entry
from .tokenizer import Tokenizer
from .validate import BLOCK_DTYPES

log = logging.getLogger("llama_fast")


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, torch.Tensor | QuantizedWeight]  # model names -> tensors (fp32, bf16 or f16 as
    # stored / dequantised), or matrices in a GGUF block format (a block-format or "native" dtype)
    tokenizer: Tokenizer
    path: str
    tensor_types: dict[str, int]  # storage type name -> tensor count, for `llama-fast info`

    def float_dtype(self, asked: torch.dtype | str | None) -> torch.dtype:
        """The dtype the model's float weights run in: `asked` when it is a torch dtype; with nothing asked,
        bfloat16 for a checkpoint whose matrices are all bf16; float32 otherwise (beside weights kept in a
        block format too)."""
        if isinstance(asked, torch.dtype):
            return asked
        matrices = {w.dtype for w in self.weights.values() if asked is None and w.dim() == 2}
        return torch.bfloat16 if matrices == {torch.bfloat16} else torch.float32


def load_checkpoint(name_or_path: str, progress: bool = True, dtype: torch.dtype | str | None = None) -> Checkpoint:
    """dtype: the floating dtype the weights will be used in, if known: a GGUF's converted copy is then
    cached in it, so loading maps the file and copies nothing (None: as stored / dequantised); or a GGUF
    block format ("q4_0", ...: every matrix in it, quantised once and cached where the file holds another
    type) or "native" (a GGUF's tensors as stored)."""
    path = resolve_model_path(name_or_path)
    if os.path.isfile(path):
        return load_gguf(path, progress, dtype)
    if os.path.exists(os.path.join(path, "config.json")):
        ckpt = load_hf_dir(path, progress)
    elif os.path.exists(os.path.join(path, "params.json")):
        ckpt = load_meta_dir(path, progress)
    else:
        raise CheckpointError(f"{path}: not a .gguf file, nor a directory with config.json (HF) or params.json (Meta)")
    if isinstance(dtype, str) and dtype != "native":
        ckpt.weights, ckpt.tensor_types = _blocks_of_floats(path, ckpt.weights, ckpt.config, dtype, progress)
    return ckpt


def _progress(items, desc: str, enabled: bool):
    return tqdm(items, desc=desc, unit="tensor", leave=False, disable=not enabled)


# ----------------------------------------------------------------------------------------------------
# GGUF (gguf_file.py reads the file). F32/F16/BF16 files are used in place: their tensors are views of
# the mapped file (Q/K reordered once). Quantised files are dequantised once into the cache and mapped.


def _as_torch(array: np.ndarray, kind: str) -> torch.Tensor:
    """A torch view of a tensor's numpy array (BF16 arrays hold the bits as uint16)."""
    if kind == "BF16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _dequantised(t: GGUFTensor) -> torch.Tensor:
    """A tensor of a quantised file as torch: float ones as views of the map, quantised ones dequantised."""
    from gguf import GGMLQuantizationType, quants

    if t.type in FLOAT_TYPES:
        return _as_torch(t.array(), t.type)
    raw = np.frombuffer(t.data, dtype=np.uint8).reshape(*t.shape[:-1], -1)
    return torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[t.type]).reshape(t.shape))


def load_gguf(path: str, progress: bool = True, dtype: torch.dtype | str | None = None) -> Checkpoint:
    gguf = GGUFFile(path)
    config = gguf_config(gguf)
    # Before any tensor is read (gguf_config checked the file's shapes): the vocabulary, so that one that
    # cannot be read caches nothing.
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata, path)
    types = _type_counts(t.type for t in gguf.tensors.values())
    if isinstance(dtype, str):
        weights, types = _gguf_in_blocks(gguf, config, dtype, progress)
    elif all(t.type in FLOAT_TYPES for t in gguf.tensors.values()):
        mapped = mapped_weights(gguf, config.n_heads, config.n_kv_heads, progress)
        weights = {name: _as_torch(array, kind) for name, (array, kind) in mapped.items()}
    else:
        weights = _quantised_gguf(gguf, config, progress, dtype)
    check_shapes(weights, config, path)  # (a cache entry's too)
    if not config.eos_token_ids:
        config.eos_token_ids = sorted(tokenizer.eos_ids)
    return Checkpoint(config, weights, tokenizer, path, types)


def _quantised_gguf(gguf: GGUFFile, config: ModelConfig, progress: bool, dtype: torch.dtype | None):
    """The weights of a file with quantised tensors: from the cache entry in `dtype` (or as dequantised), else
    dequantised now into the cache (and cast into `dtype`'s entry) and mapped from there."""
    path = gguf.path
    stored = {name: (tuple(t.shape), _FLOAT_DTYPES.get(t.type, torch.float32)) for name, t in model_tensors(gguf).items()}
    weights = ((_read_gguf_cache(path, dtype, {name: (shape, dtype) for name, (shape, _) in stored.items()})
                if dtype is not None else None) or _read_gguf_cache(path, None, stored))
    if weights is None:
        def dequantised(t: GGUFTensor) -> torch.Tensor:
            tensor = _dequantised(t)
            if t.type not in FLOAT_TYPES:
                gguf.release(t)  # its blocks were read once; float tensors are views of the file
            if t.name.endswith(QK_TENSORS):
                tensor = interleaved_to_half(tensor, config.n_heads if ".attn_q." in t.name else config.n_kv_heads)
            return tensor

        weights = _cached(path, None, {name: (*stored[name], lambda t=t: dequantised(t))
                                       for name, t in model_tensors(gguf).items()}, "dequantising GGUF", progress, gguf.opened)
    if dtype is not None and any(w.dtype != dtype for w in weights.values()):
        # Cast once and kept in `dtype` too: later loads map that entry and copy nothing. (Each mapped fp32
        # tensor's pages are dropped once cast.)
        from .model import own_weight

        mapped = FileMappings()
        weights = _cached(path, dtype, {name: (tuple(w.shape), dtype, lambda w=w: own_weight(w, w, dtype, "cpu", mapped))
                                        for name, w in weights.items()}, f"casting to {dtype}", progress, gguf.opened)
    return weights


_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _cached(path: str, dtype: torch.dtype | None, tensors: dict, desc: str, progress: bool, opened: os.stat_result
            ) -> dict[str, torch.Tensor]:
    """The weights `tensors` describes (name -> (shape, dtype, a function making the tensor)), made one at a
    time into the checkpoint's cache entry for `dtype` and mapped back from it, so they are never all in
    memory at once; made in memory where there is no cache to write. opened: the stat of the file read."""
    bar = tqdm(total=len(tensors), desc=desc, unit="tensor", leave=False, disable=not progress)

    def made(make):
        tensor = make()
        bar.update()
        return tensor

    tensors = {name: (shape, kind, lambda make=make: made(make)) for name, (shape, kind, make) in tensors.items()}
    try:
        folder = gguf_cache_path(path, dtype)
        if folder is not None:
            check_unchanged(path, opened)   # (the key must be the file's that was read)
            if write_entry(folder, {"weights.safetensors": lambda part: save_weights(tensors, part)}):
                expected = {name: (tuple(shape), kind) for name, (shape, kind, _) in tensors.items()}
                weights = read_weights(os.path.join(folder, "weights.safetensors"), expected)
                if weights is not None:
                    return weights
        return {name: make() for name, (_, _, make) in tensors.items()}
    finally:
        bar.close()


def _type_counts(kinds) -> dict[str, int]:
    counts = {}
    for kind in kinds:
        counts[kind] = counts.get(kind, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------------
# GGUF block formats (llama_fast.quant): with dtype "native" every tensor keeps its stored type; with a
# block format every matrix is in it (the K-quants' fallback where rows are not whole super-blocks). Tensors
# already in their type are mapped (Q/K rows reordered once, as for float files); a file that needs
# conversion is converted once into a GGUF in the cache (paths.gguf_cache_path), laid out as llama.cpp's
# converter lays it out (it is what `llama-fast quantize` writes), and that file is mapped instead.


def block_tensors(gguf: GGUFFile, want: str) -> list[TensorSpec]:
    """The tensors of `gguf` with dtype `want`, in its names and layout, each as a TensorSpec whose bytes are
    the stored ones where the type is kept, else converted (dequantised, requantised) when asked for."""
    specs = []
    for name, (shape, kind) in block_targets(gguf, want).items():
        t = gguf.tensors[name]
        if kind == t.type:
            specs.append((name, shape, kind, lambda t=t: np.frombuffer(t.data, np.uint8)))
        else:
            specs.append((name, shape, kind, lambda t=t, kind=kind: encode_values(_values(t), kind)))
    return specs



def quantize_gguf(src: str, dst: str, want: str, progress: bool = True) -> dict[str, int]:
    """Writes the GGUF at `src` with every matrix in block format `want` ("q4_0", ...) to `dst`, metadata kept
    (general.file_type updated): a file llama.cpp loads. Returns the count of tensors per stored type."""
    if want not in BLOCK_DTYPES:
        raise ValueError(f"--type must be one of {', '.join(BLOCK_DTYPES)}, got {want!r}")
    src = resolve_model_path(src)
    if not os.path.isfile(src):
        raise CheckpointError(f"{src}: quantize reads a .gguf file (LLM.from_pretrained(dir, dtype={want!r}) "
                              "quantises a Hugging Face or Meta directory for llama_fast itself)")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise ValueError(f"{dst}: the output must not be the input file")
    gguf = GGUFFile(src)
    gguf_config(gguf)  # a model llama_fast can read, or CheckpointError / UnsupportedModelError now
    metadata = {key: (value, *gguf.metadata_types[key]) for key, value in gguf.metadata.items()}
    metadata["general.file_type"] = (BLOCK_DTYPES[want], 4, None)  # (4: GGUF's uint32)
    specs = block_tensors(gguf, want)
    write_gguf(dst, gguf.metadata.get("general.architecture", "llama"), metadata,
               _progress(specs, f"quantising to {want}", progress))
    return _type_counts(kind for _, _, kind, _ in specs)


def _values(t: GGUFTensor) -> np.ndarray:
    """A tensor's values as fp32 numpy."""
    if t.type in FLOAT_TYPES:
        return _as_torch(t.array(), t.type).float().numpy()
    return dequantize(t.blocks(), t.type, t.shape)


def encode_values(values: np.ndarray, kind: str) -> np.ndarray:
    """fp32 values as the bytes of GGUF storage type `kind` (F32, F16, BF16 rounded to nearest even, or a
    block format): what every GGUF this project writes stores."""
    if kind == "F32":
        return np.ascontiguousarray(values, np.float32)
    if kind == "F16":
        return np.asarray(values, np.float32).astype(np.float16)
    if kind == "BF16":
        return torch.from_numpy(np.ascontiguousarray(values, np.float32)).bfloat16().view(torch.int16).numpy()
    return quantize(values.reshape(values.shape[0], -1), kind)


def _gguf_in_blocks(gguf: GGUFFile, config: ModelConfig, want: str, progress: bool):
    """-> (weights, type counts) of `gguf` with dtype `want`: its own tensors mapped where every matrix is in
    its target type already, else converted (_converted_blocks)."""
    specs = block_tensors(gguf, want)
    if any(kind != gguf.tensors[name].type for name, _, kind, _ in specs):
        return _converted_blocks(gguf.path, specs, want, config, progress, source=gguf)
    return _mapped_blocks(gguf, config, progress), _type_counts(t.type for t in gguf.tensors.values())


def _converted_blocks(path: str, specs: list[TensorSpec], want: str, config: ModelConfig, progress: bool,
                      source: GGUFFile | None = None):
    """-> (weights, type counts) of `specs` (GGUF names and layout) for the checkpoint at `path` with dtype
    `want`: mapped from its GGUF in the cache, written now if missing; converted in memory when caching is
    off (into `source`, the GGUF the specs read, where there is one)."""
    folder = gguf_cache_path(path, f"blocks:{want}")
    if folder is not None and source is not None:   # (the key must be the file's that was read)
        check_unchanged(path, source.opened)
    gguf = _converted_copy(folder, specs) if complete_entry(folder) else None
    if gguf is None and folder is not None:
        if write_entry(folder, {"weights.gguf": lambda part: write_gguf(
                part, "llama", {}, _progress(specs, f"converting to {want}", progress))}):
            gguf = GGUFFile(os.path.join(folder, "weights.gguf"))
    if gguf is None:
        gguf = _converted_in_memory(source or _EmptyGGUF(path), specs, progress)
    return _mapped_blocks(gguf, config, progress), _type_counts(t.type for t in gguf.tensors.values())


def _converted_copy(folder: str, specs: list[TensorSpec]) -> GGUFFile | None:
    """The converted GGUF of a complete cache entry if it holds what `specs` make; None (logged) for a damaged
    one, which the caller writes again."""
    file = os.path.join(folder, "weights.gguf")
    try:
        gguf = GGUFFile(file)
    except CheckpointError as err:
        log.warning("llama_fast: ignoring the damaged cache file %s (%s)", file, err)
        return None
    if stored_types(gguf) != {n: (tuple(s), k) for n, s, k, _ in specs}:
        log.warning("llama_fast: ignoring the cache file %s, which does not hold what its checkpoint makes", file)
        return None
    return gguf


def _converted_in_memory(gguf: GGUFFile, specs: list[TensorSpec], progress: bool) -> GGUFFile:
    """`gguf` with each tensor's bytes replaced by its spec's (no cache to write the conversion into)."""
    for name, shape, kind, data in _progress(specs, "converting", progress):
        gguf.tensors[name] = GGUFTensor(name, kind, shape, memoryview(np.ascontiguousarray(data()).view(np.uint8).reshape(-1)))
    return gguf


def _mapped_blocks(gguf: GGUFFile, config: ModelConfig, progress: bool) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Model name -> weight of a GGUF whose tensors are in their target types: views of the file
    (gguf_file.mapped_weights), block formats as QuantizedWeight, F16 widened to fp32."""
    weights = {}
    for name, (array, kind) in mapped_weights(gguf, config.n_heads, config.n_kv_heads, progress).items():
        if kind in QUANT_TYPES:
            weights[name] = QuantizedWeight(torch.from_numpy(array), kind, (array.shape[0], block_cols(kind, array.shape[1])))
        else:
            weights[name] = _as_torch(array, kind).float() if kind == "F16" else _as_torch(array, kind)
    return weights


def _blocks_of_floats(path: str, weights: dict[str, torch.Tensor], config: ModelConfig, want: str, progress: bool):
    """-> (weights, type counts): a float checkpoint's (HF, Meta) matrices in block format `want`, quantised
    once into a GGUF in the cache and mapped from there (in memory when caching is off)."""
    specs = []
    for name, w in weights.items():
        values = w.detach().float().numpy()
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):  # GGUF's layout (interleaved pairs)
            values = half_to_interleaved(values, config.n_heads if ".wq." in name else config.n_kv_heads)
        kind = target_type(tuple(w.shape), "F32", want)
        specs.append((gguf_tensor_name(name), tuple(w.shape), kind, lambda v=values, kind=kind: encode_values(v, kind)))
    return _converted_blocks(path, specs, want, config, progress)


class _EmptyGGUF:
    """What _converted_in_memory fills when there is no file (a float checkpoint, caching off)."""

    def __init__(self, path: str):
        self.path, self.tensors = path, {}

    def release(self, tensor) -> None:
        pass


def _read_gguf_cache(path: str, dtype: torch.dtype | None, expected: dict) -> dict[str, torch.Tensor] | None:
    """The weights of the checkpoint's complete cache entry for `dtype`, mapped, if it holds exactly the
    `expected` tensors (name -> (shape, dtype)); else None (a damaged entry is logged, and rewritten by the
    caller)."""
    folder = gguf_cache_entry(path, dtype)
    return None if folder is None else read_weights(os.path.join(folder, "weights.safetensors"), expected)


_SAFETENSORS_DTYPES = {dtype: name for name, dtype in _FLOAT_DTYPES.items()}


def save_weights(weights: dict, path: str) -> None:
    """Writes float weights as a safetensors file (what read_weights maps back), a tensor at a time: each
    value is a tensor, or (shape, dtype, a function making it), made as it is written, so that the whole
    is never in memory (safetensors' own save_file serialises every tensor first)."""
    weights = {name: w if isinstance(w, tuple) else (tuple(w.shape), w.dtype, lambda w=w: w)
               for name, w in weights.items()}
    header, offset = {}, 0
    for name, (shape, dtype, _) in weights.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the tensors' bytes start 8-aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, (shape, dtype, make) in weights.items():
            w = make()
            if tuple(w.shape) != tuple(shape) or w.dtype != dtype:
                raise ValueError(f"{name} was announced as {dtype} {tuple(shape)}, made as {w.dtype} {tuple(w.shape)}")
            f.write(memoryview(w.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))


def read_weights(path: str, expected: dict | None = None) -> dict[str, torch.Tensor] | None:
    """The tensors of a safetensors file in the cache, memory-mapped; None (logged) for a damaged file (one
    that does not read, or does not hold exactly the `expected` tensors: name -> (shape, dtype)), which the
    caller rebuilds from the checkpoint itself."""
    from safetensors.torch import load_file

    try:
        weights = load_file(path)
    except Exception as err:  # safetensors raises its own error types
        log.warning("llama_fast: ignoring the damaged cache file %s (%s)", path, err)
        return None
    held = {name: (tuple(w.shape), w.dtype) for name, w in weights.items()}
    if expected is not None and held != expected:
        odd = sorted(set(held.items()) ^ set(expected.items()), key=str)[:2]
        log.warning("llama_fast: ignoring the cache file %s, which does not hold what its checkpoint makes (%s)",
                    path, odd)
        return None
    return weights


# ----------------------------------------------------------------------------------------------------
# Hugging Face directories

_HF_NAMES = {
    "model.embed_tokens": "tok_embeddings",
    "model.norm": "norm",
    "lm_head": "output",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}


_HF_BIASES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # Qwen2's QKV biases


def hf_tensor_name(key: str) -> str | None:
    """The model's name for a Hugging Face tensor name (model.layers.3.self_attn.q_proj.weight ->
    layers.3.attention.wq.weight), or None for a tensor the model has no place for."""
    match = re.fullmatch(r"(?:model\.layers\.(\d+)\.)?([\w.]+)\.(weight|bias)", key)
    if match is None or match.group(2) not in _HF_NAMES:
        return None
    layer, base, kind = match.groups()
    if kind == "bias" and base not in _HF_BIASES:
        return None
    return (f"layers.{layer}." if layer is not None else "") + _HF_NAMES[base] + "." + kind


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read JSON ({err})") from err


def _hf_weight_files(path: str) -> list[str]:
    """The safetensors files of a Hugging Face directory: exactly those model.safetensors.index.json names, else
    model.safetensors, else every *.safetensors but Meta's consolidated*.safetensors that Mistral's repositories
    ship beside the Hugging Face files."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_file):
        index = _read_json(index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index_file}: no weight_map of tensor name -> file name")
        files = sorted(set(weight_map.values()))
        for name in files:
            # A file of the directory itself: the cache's stamp of a directory (paths._stamp) covers those.
            if os.path.basename(name) != name or not os.path.isfile(os.path.join(path, name)):
                raise CheckpointError(f"{index_file}: names {name!r}, which is not a file in {path}")
        return [os.path.join(path, name) for name in files]
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return [os.path.join(path, "model.safetensors")]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    return [f for f in files if not os.path.basename(f).startswith("consolidated")] or files


def load_hf_dir(path: str, progress: bool = True) -> Checkpoint:
    from safetensors import safe_open

    config_file = os.path.join(path, "config.json")
    hf_config = _read_json(config_file)
    with naming_the_file(config_file):
        config = ModelConfig.from_hf(hf_config)
    files = _hf_weight_files(path)
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights (pytorch_model.bin is not read: it is a pickle)")
    weights, types = {}, {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in _progress(list(f.keys()), f"loading {os.path.basename(file)}", progress):
                    name = hf_tensor_name(key)
                    if name is None:
                        if key.endswith("rotary_emb.inv_freq"):
                            continue
                        raise CheckpointError(f"{file}: unexpected tensor {key}")
                    if name in weights:
                        raise CheckpointError(f"{file}: tensor {key} is in another of the files too")
                    tensor = f.get_tensor(key)
                    weights[name] = tensor
                    types[str(tensor.dtype)] = types.get(str(tensor.dtype), 0) + 1
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error type on corrupt headers/data
            raise CheckpointError(f"{file}: not a readable safetensors file ({type(err).__name__}: {err})") from err
    if config.tie_embeddings:
        weights.pop("output.weight", None)
    elif "output.weight" not in weights:
        config.tie_embeddings = True
    check_shapes(weights, config, path)
    tokenizer = Tokenizer.from_dir(path)
    if not config.eos_token_ids and tokenizer.eos_id is not None:
        config.eos_token_ids = [tokenizer.eos_id]
    return Checkpoint(config, weights, tokenizer, path, types)


# ----------------------------------------------------------------------------------------------------
# Meta directories

# How Meta's model-parallel shards split each tensor (None: replicated).
_META_SHARD_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}


def _meta_shard(file: str) -> dict[str, torch.Tensor]:
    try:
        shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(shard, dict) or not all(isinstance(t, torch.Tensor) for t in shard.values()):
        raise CheckpointError(f"{file}: holds a {type(shard).__name__}, not a state dict (tensor name -> tensor)")
    return shard


def _joined(name: str, parts: list[torch.Tensor], files: list[str]) -> torch.Tensor:
    """Tensor `name` from its parts in Meta's model-parallel files: concatenated along the dimension Meta
    splits its kind on, else the first (it is whole in every file); the parts' shapes must agree but there."""
    dim = _META_SHARD_DIM.get(name.rpartition(".")[0].rpartition(".")[2])
    if dim is not None and dim >= parts[0].dim():
        dim = None  # (not a tensor of that kind: the shape check names it)

    def unsplit(t: torch.Tensor) -> list[int]:
        return [n for i, n in enumerate(t.shape) if i != dim]

    for part, file in zip(parts[1:], files[1:]):
        if part.dim() != parts[0].dim() or unsplit(part) != unsplit(parts[0]):
            along = "" if dim is None else f": they may differ along dimension {dim} only"
            raise CheckpointError(f"{file}: tensor {name} has shape {tuple(part.shape)}, "
                                  f"{os.path.basename(files[0])}'s is {tuple(parts[0].shape)}{along}")
    return parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)


def load_meta_dir(path: str, progress: bool = True) -> Checkpoint:
    params_file = os.path.join(path, "params.json")
    params = _read_json(params_file)
    files = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
    if not files:
        raise CheckpointError(f"{path}: no consolidated.*.pth weights")
    shards = [_meta_shard(file) for file in _progress(files, "loading Meta shards", progress)]
    first = os.path.basename(files[0])
    for file, shard in zip(files[1:], shards[1:]):
        lacks, extra = sorted(shards[0].keys() - shard.keys()), sorted(shard.keys() - shards[0].keys())
        if lacks or extra:
            raise CheckpointError(f"{file}: " + (f"lacks tensors {lacks[:5]} of {first}" if lacks else
                                                 f"has tensors {extra[:5]} that {first} lacks"))
    weights = {name: _joined(name, [shard[name] for shard in shards], files)
               for name in shards[0] if name != "rope.freqs"}
    embeddings = weights.get("tok_embeddings.weight")
    if embeddings is None or embeddings.dim() != 2:
        raise CheckpointError(f"{path}: no tensor tok_embeddings.weight of shape (vocabulary, dim)")
    with naming_the_file(params_file):
        config = ModelConfig.from_meta(params, vocab_size=embeddings.shape[0])
    config.tie_embeddings = "output.weight" not in weights
    check_shapes(weights, config, path)
    for name in list(weights):
        if name.endswith("attention.wq.weight"):
            weights[name] = interleaved_to_half(weights[name], config.n_heads)
        elif name.endswith("attention.wk.weight"):
            weights[name] = interleaved_to_half(weights[name], config.n_kv_heads)
    tokenizer = Tokenizer.from_dir(path)
    config.bos_token_id = tokenizer.bos_id
    config.eos_token_ids = sorted(tokenizer.eos_ids)
    types = {}
    for tensor in weights.values():
        types[str(tensor.dtype)] = types.get(str(tensor.dtype), 0) + 1
    return Checkpoint(config, weights, tokenizer, path, types)
