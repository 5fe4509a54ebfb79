"""ModelConfig: the architecture of a LLaMA-family checkpoint, whatever format it came in."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .paths import CheckpointError


class UnsupportedModelError(ValueError):
    """The checkpoint is readable but describes something llama_fast does not run."""


@dataclass
class ModelConfig:
    dim: int  # hidden size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int  # SwiGLU intermediate size
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF-style: {"rope_type": "llama3" | "linear", ...}, or {"rope_type": "freq_factors", "factors": [...]} (GGUF)
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 2048  # the context length the model was trained for
    tie_embeddings: bool = False
    qkv_bias: bool = False  # biases on the Q, K and V projections (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""
    sliding_window: int | None = None  # keys further back than this are never attended (Mistral, Qwen2)

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "head_dim"):
            if getattr(self, key) <= 0:
                raise UnsupportedModelError(f"ModelConfig.{key} must be positive, got {getattr(self, key)}")
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool)
                                                or not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise UnsupportedModelError(f"sliding_window must be a positive int or None, got {self.sliding_window!r}")
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3", "freq_factors"):
                raise UnsupportedModelError(
                    f"rope_scaling type {kind!r} is not supported (default, linear, llama3, freq_factors)")

    @property
    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        if self.qkv_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        embed = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + mlp + 2 * self.dim) + self.dim + embed

    # ---- constructors, one per checkpoint format ----

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """From a Hugging Face config.json (LlamaForCausalLM and close relatives; Qwen2: LLaMA with QKV biases).
        Keys that change the math are honoured (sliding_window, rope scaling) or refused, never ignored."""
        missing = [key for key in _HF_REQUIRED if key not in cfg]
        if missing:
            raise CheckpointError(f"config.json lacks {', '.join(repr(k) for k in missing)}: every LLaMA-family "
                                  f"config.json has them")
        for key, neutral in _HF_REFUSED.items():
            if cfg.get(key, neutral) not in (neutral, None):
                raise UnsupportedModelError(f"config.json's {key}={cfg[key]!r} is not supported")
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2") and not any(a in _HF_ARCHS for a in archs):
            raise UnsupportedModelError(f"architecture {archs} (model_type {model_type!r}) is not LLaMA-family")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise UnsupportedModelError("attention or MLP biases are not supported")
        qwen2 = model_type == "qwen2" or "Qwen2ForCausalLM" in archs
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (silu)")
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        theta = cfg.get("rope_theta", (rope or {}).get("rope_theta", 10000.0))
        if rope is not None and rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = None
        eos = cfg.get("eos_token_id")
        n_heads = cfg["num_attention_heads"]
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            vocab_size=cfg["vocab_size"],
            ffn_dim=cfg["intermediate_size"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qwen2,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            name=cfg.get("_name_or_path", ""),
            sliding_window=_hf_sliding_window(cfg),
        )

    @classmethod
    def from_meta(cls, params: dict[str, Any], vocab_size: int) -> "ModelConfig":
        """From a Meta params.json; vocab_size comes from the weights when params says -1."""
        dim, n_heads = params["dim"], params["n_heads"]
        ffn_dim = params.get("hidden_dim")
        if ffn_dim is None:  # Meta's FeedForward sizing rule
            ffn_dim = int(2 * 4 * dim / 3)
            if params.get("ffn_dim_multiplier") is not None:
                ffn_dim = int(params["ffn_dim_multiplier"] * ffn_dim)
            multiple_of = params.get("multiple_of", 256)
            ffn_dim = multiple_of * math.ceil(ffn_dim / multiple_of)
        rope_scaling = None
        if params.get("use_scaled_rope"):
            rope_scaling = {
                "rope_type": "llama3",
                "factor": params.get("rope_scaling_factor", 8.0),
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        vocab = params.get("vocab_size", -1)
        return cls(
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads") or n_heads,
            vocab_size=vocab if vocab and vocab > 0 else vocab_size,
            ffn_dim=ffn_dim,
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling,
            max_seq_len=params.get("max_seq_len", 2048),
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any]) -> "ModelConfig":
        """From GGUF metadata (key -> value, as read from the file)."""
        arch = meta.get("general.architecture")
        if arch not in ("llama", "mistral"):
            raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported (llama)")

        def get(key, default=None):
            return meta.get(f"{arch}.{key}", default)

        n_heads = get("attention.head_count")
        dim = get("embedding_length")
        rope_scaling = None
        if get("rope.scaling.type") == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        eos = meta.get("tokenizer.ggml.eos_token_id")
        tokens = meta.get("tokenizer.ggml.tokens")
        return cls(
            dim=dim,
            n_layers=get("block_count"),
            n_heads=n_heads,
            n_kv_heads=get("attention.head_count_kv") or n_heads,
            vocab_size=get("vocab_size") or (len(tokens) if tokens is not None else 0),
            ffn_dim=get("feed_forward_length"),
            head_dim=get("attention.key_length") or get("rope.dimension_count") or dim // n_heads,
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_seq_len=get("context_length", 2048),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[] if eos is None else [eos],
            name=meta.get("general.name", ""),
            sliding_window=get("attention.sliding_window"),
        )


_HF_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_HF_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
# config.json keys of LLaMA relatives that change the math and that the model does not implement, with the
# value that means "off".
_HF_REFUSED = {"attn_logit_softcapping": None, "final_logit_softcapping": None, "partial_rotary_factor": 1.0,
               "query_pre_attn_scalar": None, "embedding_multiplier": 1.0, "residual_multiplier": 1.0,
               "attention_multiplier": None, "logits_scaling": 1.0, "use_qk_norm": False}


def _hf_sliding_window(cfg: dict[str, Any]) -> int | None:
    """The window every layer attends within (Mistral's sliding_window; Qwen2's when use_sliding_window, on
    the layers its layer_types / max_window_layers mark), or None. Windows on only some layers are refused."""
    window = cfg.get("sliding_window")
    if window is None or cfg.get("use_sliding_window", True) is False:
        return None
    n_layers = cfg["num_hidden_layers"]
    kinds = cfg.get("layer_types")
    if kinds is None and "max_window_layers" in cfg:  # Qwen2: layers from max_window_layers on slide
        kinds = ["sliding_attention" if i >= cfg["max_window_layers"] else "full_attention" for i in range(n_layers)]
    if kinds is not None:
        sliding = [kind == "sliding_attention" for kind in kinds]
        if not any(sliding):
            return None
        if not all(sliding):
            raise UnsupportedModelError(f"config.json slides the attention window on some layers only ({kinds}): "
                                        "not supported")
    return window
