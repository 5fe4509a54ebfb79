"""The shapes and prompt the tensor-parallel test and its worker processes share."""
from llama_fast.config import ModelConfig

PROMPT = [5, 17, 200, 33, 90, 1000, 7, 64, 12, 300, 45, 99, 2000, 8, 150, 61, 73, 18, 222, 41]


def tiny_config(heads: int, kv_heads: int) -> ModelConfig:
    return ModelConfig(dim=96, n_layers=3, n_heads=heads, n_kv_heads=kv_heads, vocab_size=2050, ffn_dim=160,
                       max_seq_len=512, head_dim=16)


def lockstep_requests() -> list[tuple[list[int], int]]:
    """(prompt, new tokens) of the lockstep test's requests."""
    return [([(7 * i + j) % 2000 + 3 for j in range(5 + 13 * i % 70)], 4 + i % 9) for i in range(18)]
