"""llama_fast: fast LLaMA-family inference from Python."""
from .config import ModelConfig
from .sampling import SamplingParams
from .span import SpanBias

__all__ = ["ModelConfig", "SamplingParams", "SpanBias"]
__version__ = "0.1.0"
