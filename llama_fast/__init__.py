"""llama_fast: fast LLaMA-family inference from Python.

    from llama_fast import LLM
    llm = LLM.from_pretrained("smollm2-135m-instruct")
    print(llm.generate("I love", max_new_tokens=32).text)
"""
from .cache import CacheFullError, PagedKVCache, StaticKVCache
from .config import ModelConfig
from .engine import LLM, Completion
from .sampling import SamplingParams
from .span import SpanBias

__all__ = ["LLM", "CacheFullError", "Completion", "ModelConfig", "PagedKVCache", "SamplingParams", "SpanBias",
           "StaticKVCache"]
__version__ = "0.1.0"
