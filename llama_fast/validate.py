"""Checks of the public API's arguments, one function per kind of argument, each raising a one-line
ValueError that names the argument. Torch-free (the command line's fast start, llama_fast.lite, uses
them too); the device check imports torch only when a GPU is asked for."""
from __future__ import annotations

import math
import numbers
import os
from typing import Any

# Weight dtype names the API (LLM.from_pretrained(dtype=...)) and the CLI (--dtype) accept: name or alias
# -> canonical name. Floats are torch dtypes' names; q8_0 ... q6_k are GGUF's block formats (llama_fast.quant),
# kept as stored on CPU; "native" keeps every tensor of a file in its stored type; int8 / int4 are CUDA's
# weight-only formats (kernels/quant_matmul.py).
# The GGUF block formats a model may be quantised to (`llama-fast quantize --type`, dtype=), each with the
# general.file_type of a file in it (llama.cpp's llama_ftype: MOSTLY_Q8_0, ...; q4_k as its "S" mix, every
# matrix Q4_K, and q6_k, which llama.cpp names by its main type alone).
BLOCK_DTYPES = {"q8_0": 7, "q4_0": 2, "q4_1": 3, "q4_k": 14, "q6_k": 18}
DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16",
    **{name: name for name in BLOCK_DTYPES},
    "native": "native",
    "int8": "int8", "int4": "int4",
}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
CUDA_ONLY_DTYPES = {"int8": "q8_0", "int4": "q4_0"}  # -> the CPU's nearest block format, for the error

# Seeds are drawn in [0, 2**63): the samplers hash them as signed 64-bit integers.
SEED_LIMIT = 2**63


def dtype_name(dtype: Any, argument: str = "dtype") -> str:
    """A dtype given by name, alias or torch dtype -> its canonical name; anything else raises."""
    name = dtype
    if not isinstance(dtype, str) and type(dtype).__name__ == "dtype":  # a torch.dtype: "torch.float32"
        name = str(dtype).removeprefix("torch.")
        name = name if name in FLOAT_DTYPES else f"torch.{name}"  # (torch.int8 is not the int8 format)
    if isinstance(name, str) and name.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[name.lower()]
    raise ValueError(f"{argument} must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")


def weight_dtype(dtype: Any, device_type: str, argument: str = "dtype") -> str:
    """dtype_name(dtype) where it can run on a device of `device_type` ("cpu", "cuda"): int8 / int4 are
    CUDA's, the GGUF block formats and "native" (which may keep them) the CPU's."""
    name = dtype_name(dtype, argument)
    if device_type != "cuda" and name in CUDA_ONLY_DTYPES:
        raise ValueError(f"{argument} {name} is a CUDA weight format; on the CPU use {CUDA_ONLY_DTYPES[name]} "
                         f"(GGUF's block format of the same width)")
    if device_type == "cuda" and name not in FLOAT_DTYPES and name not in CUDA_ONLY_DTYPES:
        raise ValueError(f"{argument} {name} runs on the CPU; on CUDA use one of "
                         f"{', '.join(FLOAT_DTYPES + tuple(CUDA_ONLY_DTYPES))}")
    return name


def device_name(device: Any, argument: str = "device") -> str:
    """"cpu" (also None), "cuda", "cuda:N", an int N (= "cuda:N", as torch reads it) or a torch.device ->
    its name. A CUDA device on a torch build or machine without CUDA raises, saying so."""
    if device is None:
        return "cpu"
    if isinstance(device, bool):
        raise ValueError(f"{argument} must be 'cpu', 'cuda', 'cuda:N' or a GPU index, got {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"{argument} as a GPU index must be >= 0, got {device}")
        name = f"cuda:{device}"
    else:
        name = str(device).strip().lower()
        name = f"cuda:{name}" if name.isdigit() else name
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index not in ("", "0")):
        raise ValueError(f"{argument} must be 'cpu', 'cuda', 'cuda:N' or a GPU index, got {device!r}")
    if kind == "cpu":
        return "cpu"
    import torch

    if torch.version.cuda is None:
        raise ValueError(f"{argument}={device!r}: this torch build ({torch.__version__}) has no CUDA; use device='cpu'")
    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError(f"{argument}={device!r}: no CUDA GPU is visible on this machine; use device='cpu'")
    if index and int(index) >= count:
        raise ValueError(f"{argument}={device!r}: only {count} CUDA GPU(s) are visible")
    return name


def integer(value: Any, argument: str, *, minimum: int | None = None, maximum: int | None = None,
            optional: bool = False) -> int | None:
    """An int (bool is not one) in [minimum, maximum]; None too when optional."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{argument} must be an int{' or None' if optional else ''}, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        low = "" if minimum is None else f">= {minimum}"
        high = "" if maximum is None else f"<= {maximum}"
        raise ValueError(f"{argument} must be {' and '.join(b for b in (low, high) if b)}, got {value!r}")
    return int(value)


def real(value: Any, argument: str) -> float:
    """A finite int or float (bool and str are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{argument} must be a finite number, got {value!r}")
    return float(value)


def seed(value: Any, n_rows: int = 1, argument: str = "seed") -> int | None:
    """A seed in [0, SEED_LIMIT) or None; row r of a batch of n_rows draws from seed + r, which must stay
    in range too (never wrapped: two seeds never silently mean the same stream)."""
    if value is None:
        return None
    integer(value, argument)
    if not 0 <= value <= SEED_LIMIT - n_rows:
        rows = f" (the batch's {n_rows} rows draw from seed .. seed + {n_rows - 1})" if n_rows > 1 else ""
        raise ValueError(f"{argument} must be in [0, 2**63 - {n_rows}]{rows}, got {value}"
                         if n_rows > 1 else f"{argument} must be in [0, 2**63), got {value}")
    return int(value)


def text(value: str, argument: str) -> str:
    """A str that is valid Unicode: a lone surrogate (e.g. JSON's "\\ud800") has no UTF-8 form and no tokens."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{argument} is not valid Unicode: {err.reason} at character {err.start}") from None
    return value


def stop(value: Any, argument: str = "stop") -> None:
    if value is None:
        return
    if isinstance(value, str):
        text(value, argument)
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise ValueError(f"{argument} must be a str, a list of str or None, got {value!r}")
    for i, s in enumerate(value):
        text(s, f"{argument}[{i}]")


def prompts(prompt: Any, argument: str = "prompt") -> tuple[list[str | list[int]], bool]:
    """A prompt (str, or token ids: a list of ints) or a list of them -> (the prompts, whether one was
    given). Chat messages are LLM.chat's, not a prompt."""
    def one(p) -> bool:
        return isinstance(p, str) or (isinstance(p, list) and bool(p) and all(_is_token(t) for t in p))

    if one(prompt):
        found, single = [prompt], True
    elif isinstance(prompt, (list, tuple)) and prompt and all(one(p) for p in prompt):
        found, single = list(prompt), False
    else:
        hint = " (chat messages go to LLM.chat)" if isinstance(prompt, dict) or (
            isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, dict) for p in prompt)) else ""
        raise ValueError(f"{argument} must be a str, a non-empty list of str, or token ids (a non-empty list of "
                         f"int, or a list of those), got {_short(prompt)}{hint}")
    for i, p in enumerate(found):
        if isinstance(p, str):
            text(p, argument if single else f"{argument}[{i}]")
    return found, single


def prompt_token_ids(prompt: str | list[int], tokenizer, vocab_size: int, context: int | None) -> list[int]:
    """One prompt of prompts() -> its token ids: a str encoded, token ids given; either at most `context` long
    (None: no bound), every id in the model's vocabulary."""
    from .tokenizer import check_context, encode_prompt

    if isinstance(prompt, str):
        ids = encode_prompt(tokenizer, text(prompt, "prompt"), context)
    else:
        if not isinstance(prompt, (list, tuple)) or not all(_is_token(t) for t in prompt):
            raise ValueError(f"a prompt must be a str or a list of token ids (ints), got {type(prompt).__name__}")
        if not prompt:
            raise ValueError("a prompt must contain at least one token")
        ids = [int(t) for t in prompt]
        check_context(len(ids), context)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got {bad[:5]}")
    return ids


def messages(value: Any, argument: str = "messages") -> list[dict]:
    """Chat messages: a non-empty list of dicts, each with a str "role" and a str "content"."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{argument} must be a non-empty list of {{'role': str, 'content': str}} dicts, got "
                         f"{_short(value)}")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"{argument}[{i}] must be a dict with 'role' and 'content', got {_short(m)}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise ValueError(f"{argument}[{i}]['{key}'] must be a str, got {_short(m.get(key))}")
            text(m[key], f"{argument}[{i}]['{key}']")
    return list(value)


def path_or_name(value: Any, argument: str = "name_or_path") -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{argument} must be a model name or a path, got {_short(value)}")
    return value


def _is_token(t) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def _short(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def one_prompt(prompt: Any, render_chat) -> str | list[int]:
    """stream's prompt: one str, token ids, or chat messages (a list of dicts), which render_chat(messages,
    add_generation_prompt=True) turns into the prompt."""
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        return render_chat(messages(prompt, "prompt"), add_generation_prompt=True)
    found, single = prompts(prompt)
    if not single:
        raise ValueError(f"prompt must be one str, token ids or chat messages (stream takes one prompt), got a "
                         f"list of {len(found)} prompts")
    return found[0]
