"""llama_fast: fast LLaMA-family inference from Python.

    from llama_fast import LLM
    llm = LLM.from_pretrained("smollm2-135m-instruct")
    print(llm.generate("I love", max_new_tokens=32).text)

The names below are imported on first use, so `import llama_fast` (and the command line's fast start,
llama_fast.lite) does not import torch until something needs it.
"""
import importlib

_EXPORTS = {
    "LLM": "llm", "Completion": "llm", "Engine": "engine", "AsyncEngine": "engine", "RequestOutput": "engine",
    "QueueFullError": "errors", "CacheFullError": "cache", "PagedKVCache": "cache",
    "StaticKVCache": "cache", "ModelConfig": "config", "SamplingParams": "sampling", "SpanBias": "span",
    "Tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llama_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
