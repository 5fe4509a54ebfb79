"""Generation without importing torch: the command line's fast start on CPU.

`import torch` alone takes 2-4 s on a small machine, longer than everything else before the first token.
So where a command needs nothing but the C++ decode step, `llama-fast generate` and `llama-fast chat` run
here: the checkpoint is a GGUF whose matrices are in the dtype asked for (float32 or bfloat16; a block
format such as q4_0, or "native": docs/quantization.md), mapped in place as the engine's loader maps it
(gguf_file.py), or a GGUF the engine has already converted into the cache (paths.gguf_cache_path) in that
dtype; the tokenizer is built from the file's
metadata; llama_fast._lite (csrc/lite/lite_module.cpp: the engine's C++ session and sampler, bound without
libtorch) runs the prompt in chunks and then one step per token, dense or with a window and sinks, with
the engine's sampler and penalties: the engine's text. For anything else LiteLLM.open returns None (and
logs why) and the caller uses LLM.

    lite = LiteLLM.open("smollm2-135m-instruct")          # None: use llama_fast.LLM
    for piece in lite.stream("Once upon a time", max_new_tokens=32):
        print(piece, end="")
"""
from __future__ import annotations

import functools
import importlib
import json
import logging
import mmap
import os
import sys
from typing import Iterator

import numpy as np
from gguf import GGMLQuantizationType, quants

from . import rope, validate
from .config import ModelConfig, UnsupportedModelError
from .gguf_file import FLOAT_TYPES, GGUFFile, block_targets, gguf_config, mapped_weights, model_tensors, stored_types
from .quant import QUANT_TYPES, block_cols
from .paths import CheckpointError, gguf_cache_entry, resolve_model_path
from .sampling import PenaltyWindow, SamplingParams, check_request, row_params
from .threads import ThreadTuner
from .tokenizer import Tokenizer, stop_strings, stream_text
from .window import check_window, checkpoint_window, prefill_chunk

log = logging.getLogger("llama_fast")

_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16"}
BLOCK_SIZE = 16  # tokens per KV block, as session.BLOCK_SIZE


def read_safetensors(path: str) -> dict[str, tuple[memoryview, str, list[int]]]:
    """name -> (its bytes in a read-only memory map of the file, dtype ("F32", "BF16", ...), shape)."""
    try:
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        size = int.from_bytes(mapped[:8], "little")
        header = json.loads(mapped[8:8 + size])
        header.pop("__metadata__", None)
        data = memoryview(mapped)[8 + size:]
        tensors = {}
        for name, info in header.items():
            start, end = info["data_offsets"]
            if not 0 <= start <= end <= len(data):
                raise ValueError(f"{name}'s bytes [{start}, {end}) are outside the file's data ({len(data)} bytes)")
            tensors[name] = (data[start:end], info["dtype"], list(info["shape"]))
        return tensors
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err


class LiteLLM:
    """One model on the C++ decode step, without torch; `stream` as LLM.stream."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, tensors: dict, path: str,
                 window: int | None = None, sink_tokens: int = 0):
        check_window(window, sink_tokens)
        self.config, self.tokenizer, self.tensors, self.path = config, tokenizer, tensors, path
        self.window, self.sink_tokens = window, sink_tokens
        self.eos_ids = tokenizer.eos_ids | set(config.eos_token_ids)

    @classmethod
    def open(cls, name_or_path: str, dtype: str | None = None, window: int | None = None,
             sink_tokens: int = 0) -> "LiteLLM | None":
        """The model, or None where it needs the torch engine (LLM): not a GGUF, a GGUF whose matrices are in
        another dtype (or a quantised one not in the cache in this dtype yet), a dtype other than float32 /
        bfloat16 (None: as LLM.from_pretrained picks), the extension not built, or $LLAMA_FAST_LITE=0 / $LLAMA_FAST_BACKEND / $LLAMA_FAST_DECODE
        set. window / sink_tokens: as SpanBias's (None: dense)."""
        check_window(window, sink_tokens)
        dtype = None if dtype is None else validate.dtype_name(dtype)
        found = _unsupported(dtype or "float32") or cls._from_gguf(resolve_model_path(name_or_path), dtype, window,
                                                                  sink_tokens)
        if isinstance(found, str):
            log.info("llama_fast: not the fast start (%s)", found)
            return None
        return found

    @classmethod
    def _from_gguf(cls, path: str, dtype: str | None, window: int | None, sink_tokens: int) -> "LiteLLM | str":
        """The model from a GGUF file, or why not. dtype None: bfloat16 for a file whose matrices are all
        BF16, else float32 (as LLM.from_pretrained)."""
        if not os.path.isfile(path):
            return f"{path} is not a GGUF file"
        gguf = GGUFFile(path)
        if dtype is None:
            matrices = {t.type for t in gguf.tensors.values() if len(t.shape) == 2}
            dtype = "bfloat16" if matrices == {"BF16"} else "float32"
        try:
            config = gguf_config(gguf)
        except UnsupportedModelError as err:
            return str(err)
        tensors = _gguf_tensors(gguf, config, dtype)
        if isinstance(tensors, str):
            return tensors
        window = checkpoint_window(window, sink_tokens, config.sliding_window)
        return cls(config, Tokenizer.from_gguf_metadata(gguf.metadata, path), tensors, path, window, sink_tokens)

    def stream(self, prompt: str | list[dict], *, max_new_tokens: int = 256, seed: int | None = None,
               stop: str | list[str] | None = None, temperature: float = 0.0, **sampling) -> Iterator[str]:
        """LLM.stream: the continuation of one prompt (or a chat, given a list of messages) as text pieces;
        `sampling`: the other SamplingParams (top_k, top_p, min_p, penalties)."""
        chat = functools.partial(self.tokenizer.apply_chat_template, tokenize=True)  # content stays text
        prompt = validate.one_prompt(prompt, chat)
        check_request(1, max_new_tokens, stop, seed, dict(temperature=temperature, **sampling))
        stops = stop_strings(stop)
        params = row_params(1, seed, temperature=temperature, **sampling)[0]
        ids = validate.prompt_token_ids(prompt, self.tokenizer, self.config.vocab_size,
                                        self.config.max_seq_len if self.window is None else None)
        steps = self.generate_ids(ids, params, max_new_tokens)
        return (text for _, text, _, _ in stream_text(self.tokenizer, [ids], steps, stops, self.eos_ids) if text)

    def generate_ids(self, ids: list[int], params: SamplingParams, max_new_tokens: int,
                     stop_at_eos: bool = True) -> Iterator[list[int]]:
        """The decode loop, LLM.generate_ids for one row: yields [new token] per step (stop_at_eos=False runs
        max_new_tokens steps whatever it samples: benchmarks). The same C++ session as the engine's
        (csrc/core/session.h), so the same text, window and sinks included."""
        c = self.config
        steps = max_new_tokens if self.window is not None else min(max_new_tokens, c.max_seq_len - len(ids))
        if steps <= 0:
            return
        lite = _lite()
        window, sinks, chunk = self.window or 0, self.sink_tokens, prefill_chunk(self.window)
        session = lite.Session(
            n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, norm_eps=c.norm_eps,
            max_positions=c.max_seq_len, weights=self.tensors, owner=self.tensors,
            inv_freq=rope.inv_freq(c.head_dim, c.rope_theta, c.rope_scaling), alibi_slopes=[], bucket_table=[],
            window=window, sinks=sinks, logit_softcap=0.0, scale=0.0,
            num_blocks=lite.blocks_for_sequence(len(ids) + steps, chunk, window, sinks, BLOCK_SIZE),
            block_size=BLOCK_SIZE, kv_dtype="BF16" if self.tensors["tok_embeddings.weight"][1] == "BF16" else "F32",
            num_threads=0, isa="auto")
        seq = session.add_sequence()
        for start in range(0, len(ids), chunk):
            piece = ids[start:start + chunk]
            logits = session.step([seq], [len(piece)], piece)
        threads = session.num_threads
        tuner = ThreadTuner([threads, 1]) if threads > 1 else None
        penalties = PenaltyWindow(ids, params, np.zeros(session.vocab, dtype=np.int32)) if params.has_penalties else None
        for step in range(steps):
            token = lite.sample_row(logits[0], None if penalties is None else penalties.counts, params.temperature,
                                    params.top_k, params.top_p, params.min_p, params.seed, step,
                                    params.repetition_penalty, params.presence_penalty, params.frequency_penalty)
            yield [token]
            if (stop_at_eos and token in self.eos_ids) or step == steps - 1:
                return
            if penalties is not None:
                penalties.push(token)
            if tuner is None:
                logits = session.step([seq], [1], [token])
            else:
                logits = tuner.run(session, session.step, [seq], [1], [token])


def _lite():
    return importlib.import_module("llama_fast._lite")


def _unsupported(dtype: str) -> str | None:
    """Why LiteLLM cannot take this request before any file is read, or None."""
    if os.environ.get("LLAMA_FAST_LITE") == "0":
        return "LLAMA_FAST_LITE=0"
    for var in ("LLAMA_FAST_BACKEND", "LLAMA_FAST_DECODE"):
        if os.environ.get(var):
            return f"{var} is set"
    if dtype not in _SAFETENSORS_DTYPE and dtype != "native" and dtype.upper() not in QUANT_TYPES:
        return f"dtype {dtype}"
    try:
        _lite()
    except ImportError as err:
        return f"llama_fast._lite does not load: {err}"
    return None


def _gguf_tensors(gguf: GGUFFile, config: ModelConfig, dtype: str) -> dict | str:
    """name -> (buffer, dtype, shape) of the file's weights in `dtype`, or why not. A float file whose
    matrices are in `dtype` is mapped in place (loaders.load_gguf's way; its other vectors are rounded to
    `dtype` as build_model rounds them, so the text is the engine's); a quantised file is read from the
    engine's cache entry."""
    if dtype not in _SAFETENSORS_DTYPE:
        return _block_tensors(gguf, config, dtype)
    want = _SAFETENSORS_DTYPE[dtype]
    if any(t.type not in FLOAT_TYPES for t in gguf.tensors.values()):
        return _cached_gguf(gguf, dtype) or f"{gguf.path} is quantised and not in the cache in {dtype} yet"
    matrices = {t.type for t in gguf.tensors.values() if len(t.shape) == 2}
    if matrices != {want}:
        return f"{gguf.path} holds {'/'.join(sorted(matrices))} matrices, not {want}"
    tensors = {}
    for name, (array, kind) in mapped_weights(gguf, config.n_heads, config.n_kv_heads, sys.stderr.isatty()).items():
        if kind != want and (kind, want) != ("F32", "BF16"):
            return f"{gguf.path}: {name} is {kind}, the matrices are {want}"
        shape = list(array.shape)
        if kind != want:  # an F32 norm in a BF16 file (quantize gives its bytes)
            array = quants.quantize(array, GGMLQuantizationType.BF16)
        tensors[name] = (array, want, shape)
    return tensors


def _block_tensors(gguf: GGUFFile, config: ModelConfig, dtype: str) -> dict | str:
    """name -> (buffer, type, shape) for a block format or "native" (loaders.load_gguf's rules): the file's
    own tensors where each is in its target type already, else those of the engine's converted copy in the
    cache; or why not (the copy is not there yet: LLM writes it)."""
    targets = block_targets(gguf, dtype)
    if any(kind != gguf.tensors[name].type for name, (_, kind) in targets.items()):
        entry = gguf_cache_entry(gguf.path, f"blocks:{dtype}")
        if entry is None:
            return f"{gguf.path} needs converting to {dtype} and is not in the cache yet"
        try:
            copy = GGUFFile(os.path.join(entry, "weights.gguf"))
        except CheckpointError as err:
            return f"{gguf.path}: its copy in {dtype} in the cache is damaged ({err}); the engine makes it again"
        if stored_types(copy) != targets:
            return f"{gguf.path}: its copy in {dtype} in the cache ({entry}) does not hold its tensors; the engine makes it again"
        gguf = copy
    tensors = {}
    for name, (array, kind) in mapped_weights(gguf, config.n_heads, config.n_kv_heads, sys.stderr.isatty()).items():
        shape = [array.shape[0], block_cols(kind, array.shape[1])] if kind in QUANT_TYPES else list(array.shape)
        tensors[name] = (array, kind, shape)
    return tensors


def _cached_gguf(gguf: GGUFFile, dtype: str) -> dict | None:
    """The tensors of the cache entry holding the quantised `gguf` dequantised to `dtype`, or None. As
    loaders.load_gguf looks: the entry for the dtype, else the stored one if it is in that dtype already;
    an entry that does not read or does not hold the file's tensors is left for the engine to make again."""
    want = _SAFETENSORS_DTYPE[dtype]
    shapes = {name: list(t.shape) for name, t in model_tensors(gguf).items()}
    for key in (f"torch.{dtype}", None):
        folder = gguf_cache_entry(gguf.path, key)
        if folder is None:
            continue
        try:
            tensors = read_safetensors(os.path.join(folder, "weights.safetensors"))
        except CheckpointError as err:
            log.info("llama_fast: cache entry %s unreadable (%s)", folder, err)
            return None
        if {name: shape for name, (_, _, shape) in tensors.items()} != shapes:
            log.info("llama_fast: cache entry %s does not hold the file's tensors", folder)
            return None
        if all(dtype_name == want for _, dtype_name, _ in tensors.values()):
            return tensors
    return None
