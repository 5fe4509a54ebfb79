"""The seed article's API, kept as it was written (docs/ARCHITECTURE.md section 2):

    from llama_fast.modeling import LLaMAModel, PreTrainedTokenizer
    tokenizer = PreTrainedTokenizer.from_pretrained('llama-base')
    model = LLaMAModel.from_pretrained('llama-base')
    generated_tokens = model.generate("I love", num_return_sequences=1, max_length=10)
    print(tokenizer.decode(generated_tokens[0]))

'llama-base' names the embedded default model. Both classes are thin wrappers over llama_fast.LLM.
"""
from __future__ import annotations

from .llm import LLM
from .loaders import load_checkpoint
from .tokenizer import Tokenizer


class PreTrainedTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "PreTrainedTokenizer":
        return cls(load_checkpoint(name_or_path, progress=False).tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)
        return self.tokenizer.decode(ids, skip_special=skip_special_tokens)


class LLaMAModel:
    def __init__(self, llm: LLM):
        self.llm = llm

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "LLaMAModel":
        return cls(LLM.from_pretrained(name_or_path, **kwargs))

    def generate(self, text: str, num_return_sequences: int = 1, max_length: int = 20, **sampling) -> list[list[int]]:
        """Token ids of prompt + continuation, one list per returned sequence; max_length counts the prompt
        tokens too (as Hugging Face's generate does). Greedy unless sampling settings say otherwise."""
        prompt_ids = self.llm.tokenizer.encode(text)
        max_new = max_length - len(prompt_ids)
        if max_new < 0:
            raise ValueError(f"max_length ({max_length}) is shorter than the prompt ({len(prompt_ids)} tokens)")
        out = self.llm.generate(text, max_new_tokens=max_new, num_return_sequences=num_return_sequences, **sampling)
        completions = out if num_return_sequences > 1 else [out]
        return [prompt_ids + c.token_ids for c in completions]
