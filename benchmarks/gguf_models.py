"""GGUF files of real LLaMA shapes with random weights, laid out as llama.cpp's converter lays them out, so
llama_fast and llama.cpp read the same file: the scale benchmark's models (and the quantization
benchmark's, which reuses this writer).

    path = model_file("1b", "BF16")            # written once into the cache folder, then reused
    write_gguf(path, config, weights, "F32")   # any model's weights (model names, rotate-half Q/K rows)

The vocabulary is the embedded model's byte-level BPE (49,152 tokens) padded with unused tokens to the
shape's vocabulary size, so the embedding and output matrices have the real model's size.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from llama_fast import rope
from llama_fast.config import ModelConfig
from llama_fast.gguf_file import ROPE_FACTORS, GGUFFile, gguf_tensor_name, half_to_interleaved
from llama_fast.loaders import encode_values, quantize_gguf
from llama_fast.paths import DEFAULT_MODEL, cache_dir, resolve_model_path

_LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
# Hugging Face's config.json of each model, in ModelConfig's terms.
SHAPES = {
    "1b": ModelConfig(name="Llama-3.2-1B", dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                      vocab_size=128256, rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0),
                      max_seq_len=131072, tie_embeddings=True),
    "3b": ModelConfig(name="Llama-3.2-3B", dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192,
                      vocab_size=128256, rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=32.0),
                      max_seq_len=131072, tie_embeddings=True),
    "8b": ModelConfig(name="Llama-3.1-8B", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                      vocab_size=128256, rope_theta=500000.0, rope_scaling=dict(_LLAMA3_ROPE, factor=8.0),
                      max_seq_len=131072, tie_embeddings=False),
}
FILE_TYPES = {"F32": GGMLQuantizationType.F32, "F16": GGMLQuantizationType.F16, "BF16": GGMLQuantizationType.BF16}
_FILE_TYPE_IDS = {"F32": 0, "F16": 1, "BF16": 32}  # general.file_type (llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / _BF16)


def weight_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Model name -> torch shape of every weight of a (bias-free) LLaMA, in the order llama.cpp writes them."""
    shapes = {"tok_embeddings.weight": (c.vocab_size, c.dim)}
    for i in range(c.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (c.dim,),
            p + "attention.wq.weight": (c.n_heads * c.head_dim, c.dim),
            p + "attention.wk.weight": (c.n_kv_heads * c.head_dim, c.dim),
            p + "attention.wv.weight": (c.n_kv_heads * c.head_dim, c.dim),
            p + "attention.wo.weight": (c.dim, c.n_heads * c.head_dim),
            p + "ffn_norm.weight": (c.dim,),
            p + "feed_forward.w1.weight": (c.ffn_dim, c.dim),
            p + "feed_forward.w2.weight": (c.dim, c.ffn_dim),
            p + "feed_forward.w3.weight": (c.ffn_dim, c.dim),
        })
    shapes["norm.weight"] = (c.dim,)
    if not c.tie_embeddings:
        shapes["output.weight"] = (c.vocab_size, c.dim)
    return shapes


def _tokenizer_metadata(vocab_size: int) -> dict:
    """The embedded model's tokenizer.* metadata, its vocabulary padded with unused tokens to vocab_size."""
    meta = {k: v for k, v in GGUFFile(resolve_model_path(DEFAULT_MODEL)).metadata.items() if k.startswith("tokenizer.")}
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size {vocab_size} is below the embedded tokenizer's {len(tokens)} tokens")
    unused = range(vocab_size - len(tokens))
    meta["tokenizer.ggml.tokens"] = tokens + [f"<|unused_{i}|>" for i in unused]
    meta["tokenizer.ggml.token_type"] = types + [1] * len(unused)  # NORMAL: ids no merge produces
    return meta


def _add_metadata(writer: GGUFWriter, c: ModelConfig, file_type: str) -> None:
    writer.add_name(c.name or "random")
    writer.add_file_type(_FILE_TYPE_IDS[file_type])
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.dim)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(c.ffn_dim)
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    for key, value in _tokenizer_metadata(c.vocab_size).items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        else:
            writer.add_uint32(key, value)


def _rope_factors(c: ModelConfig) -> np.ndarray | None:
    """llama.cpp's rope_freqs tensor for a llama3-scaled RoPE: each frequency's divisor (rope.py's rule)."""
    if c.rope_scaling is None:
        return None
    if c.rope_scaling.get("rope_type") != "llama3":
        raise ValueError(f"the writer stores llama3 rope scaling only, got {c.rope_scaling}")
    plain, scaled = rope.inv_freq(c.head_dim, c.rope_theta), rope.inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
    return (np.array(plain, np.float64) / np.array(scaled, np.float64)).astype(np.float32)


def write_gguf(path: str, config: ModelConfig, weight: Callable[[str], np.ndarray], file_type: str) -> None:
    """Writes a GGUF of `config`'s shape: weight(model name) -> its fp32 values (rotate-half Q/K rows),
    called once per tensor, in file order, so no more than one tensor is in memory. Matrices are stored
    in file_type ("F32", "F16" or "BF16"), vectors in F32 (as llama.cpp's converter does); Q/K rows in GGUF's
    interleaved order. Written to path + ".part" first: an interrupted write leaves no file at `path`."""
    shapes = weight_shapes(config)
    factors = _rope_factors(config)
    writer = GGUFWriter(path + ".part", "llama")
    _add_metadata(writer, config, file_type)
    stored = {}  # GGUF name -> (model name, type)
    if factors is not None:
        writer.add_tensor_info(ROPE_FACTORS, factors.shape, np.dtype(np.float32), factors.nbytes)
    for name, shape in shapes.items():
        kind = file_type if len(shape) == 2 else "F32"
        item = 4 if kind == "F32" else 2
        byte_shape = (*shape[:-1], shape[-1] * item)
        writer.add_tensor_info(gguf_tensor_name(name), byte_shape, np.dtype(np.uint8), int(np.prod(shape)) * item,
                               raw_dtype=FILE_TYPES[kind])
        stored[gguf_tensor_name(name)] = (name, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if factors is not None:
        writer.write_tensor_data(factors)
    for gguf_name, (name, kind) in stored.items():
        values = np.asarray(weight(name), dtype=np.float32).reshape(shapes[name])
        if name.endswith(("wq.weight", "wk.weight")):
            values = half_to_interleaved(values, config.n_heads if name.endswith("wq.weight") else config.n_kv_heads)
        writer.write_tensor_data(encode_values(values, kind))
    writer.close()
    os.replace(path + ".part", path)


class RandomWeights:
    """weight(name) for write_gguf: matrices ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1^2). Each tensor tiles
    a slice of one pool of 2^24 random values per fan-in (a random start per tensor): gigabytes of
    weights are written at the disk's speed, and no two tensors alike."""

    POOL = 1 << 24

    def __init__(self, shapes: dict[str, tuple[int, ...]], seed: int = 0):
        self.shapes, self.rng, self.pools = shapes, np.random.default_rng(seed), {}

    def __call__(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        if len(shape) == 1:
            return (1.0 + 0.1 * self.rng.standard_normal(shape)).astype(np.float32)
        fan_in = shape[1]
        if fan_in not in self.pools:
            self.pools[fan_in] = (self.rng.standard_normal(self.POOL) / fan_in ** 0.5).astype(np.float32)
        start = int(self.rng.integers(self.POOL))
        return np.resize(self.pools[fan_in][start:], shape)


def model_file(shape: str, file_type: str, folder: str | None = None) -> str:
    """The random-weight GGUF of SHAPES[shape] in file_type (F32, F16, BF16, or a block format: Q8_0, Q4_0, ...,
    every matrix of the BF16 file quantized by `llama-fast quantize`), written into `folder` (default: the
    cache's "scale" folder) unless it is there already."""
    folder = folder or os.path.join(cache_dir() or os.path.expanduser("~/.cache/llama_fast"), "scale")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{SHAPES[shape].name}-random.{file_type}.gguf")
    if not os.path.exists(path) and file_type not in FILE_TYPES:  # a block format: the BF16 file quantized
        quantize_gguf(model_file(shape, "BF16", folder), path, file_type.lower(), progress=False)
    elif not os.path.exists(path):
        config = SHAPES[shape]
        write_gguf(path, config, RandomWeights(weight_shapes(config)), file_type)
    return path
