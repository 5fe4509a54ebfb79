"""llama_fast: fast LLaMA-family inference from Python."""
from .cache import CacheFullError, PagedKVCache, StaticKVCache
from .config import ModelConfig
from .sampling import SamplingParams
from .span import SpanBias

__all__ = ["CacheFullError", "ModelConfig", "PagedKVCache", "SamplingParams", "SpanBias", "StaticKVCache"]
__version__ = "0.1.0"
