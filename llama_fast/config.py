"""ModelConfig: the architecture of a LLaMA-family checkpoint, whatever format it came in."""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .paths import CheckpointError


class UnsupportedModelError(ValueError):
    """The checkpoint is readable but describes something llama_fast does not run."""


class ConfigValueError(ValueError):
    """A ModelConfig field (or a number it is computed from) of the wrong type or out of range. The from_*
    constructors raise it as a CheckpointError naming the checkpoint's key instead."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def _count(value, field: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ConfigValueError(field, f"must be {kind}, got {value!r}")
    return value


def _positive_number(value, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigValueError(field, f"must be a positive finite number, got {value!r}")
    return float(value)


def _token_id(value, field: str, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ConfigValueError(field, f"must be a token id in [0, {vocab_size}), got {value!r}")
    return value


_ROPE_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_scaling(rope: Any) -> dict[str, Any] | None:
    """A rope_scaling checked (its kind supported, its numbers positive), None for the default RoPE."""
    if rope is None:
        return None
    if not isinstance(rope, dict):
        raise ConfigValueError("rope_scaling", f"must be an object (rope_type and its numbers), got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3", "freq_factors"):
        raise UnsupportedModelError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3, "
                                    "freq_factors)")
    for key in _ROPE_NUMBERS:
        if key in rope or (key == "factor" and kind != "freq_factors"):  # (rope.py reads them)
            _positive_number(rope.get(key), f"rope_scaling.{key}")
    return rope


@contextmanager
def _named_by(keys: dict[str, str]):
    """A ConfigValueError raised inside as a CheckpointError naming the checkpoint's key of the field. keys:
    field -> key; a field not there is named as it is, a sub-field ("rope_scaling.factor") by its own key or
    after its field's."""
    try:
        yield
    except ConfigValueError as err:
        head, dot, rest = err.field.partition(".")
        key = keys.get(err.field) or keys.get(head, head) + dot + rest
        raise CheckpointError(f"{key} {err.problem}") from None


@contextmanager
def naming_the_file(path: str):
    """The errors of reading a config from the file at `path` (CheckpointError, UnsupportedModelError), each
    raised again naming the file first."""
    try:
        yield
    except (CheckpointError, UnsupportedModelError) as err:
        raise type(err)(f"{path}: {err}") from None


def _require(cfg: Any, keys: tuple[str, ...], file: str) -> None:
    """CheckpointError unless `cfg` (a config file's JSON) is an object with every one of `keys`."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file} holds a {type(cfg).__name__}, not an object")
    missing = [key for key in keys if key not in cfg]
    if missing:
        raise CheckpointError(f"{file} lacks {', '.join(repr(k) for k in missing)}: every LLaMA-family {file} "
                              "has them")


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
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim"):
            _count(getattr(self, key), key)
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        _count(self.head_dim, "head_dim")
        _count(self.max_seq_len, "max_seq_len")
        if self.sliding_window is not None:
            _count(self.sliding_window, "sliding_window")
        self.norm_eps = _positive_number(self.norm_eps, "norm_eps")
        self.rope_theta = _positive_number(self.rope_theta, "rope_theta")
        self.rope_scaling = _rope_scaling(self.rope_scaling)
        if self.bos_token_id is not None:
            _token_id(self.bos_token_id, "bos_token_id", self.vocab_size)
        if not isinstance(self.eos_token_ids, list):
            raise ConfigValueError("eos_token_ids", f"must be a list of token ids, got {self.eos_token_ids!r}")
        for i in self.eos_token_ids:
            _token_id(i, "eos_token_ids", self.vocab_size)
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise UnsupportedModelError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

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
        _require(cfg, _HF_REQUIRED, "config.json")
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
        rope_key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"  # (transformers 5's name)
        rope = cfg.get(rope_key)
        theta = rope.get("rope_theta", 10000.0) if isinstance(rope, dict) else 10000.0  # (transformers 5's place)
        eos = cfg.get("eos_token_id")
        n_heads = cfg["num_attention_heads"]
        with _named_by({**_HF_KEYS, "rope_scaling": rope_key}):
            return cls(
                dim=cfg["hidden_size"],
                n_layers=cfg["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                vocab_size=cfg["vocab_size"],
                ffn_dim=cfg["intermediate_size"],
                head_dim=cfg.get("head_dim") or 0,
                norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=cfg.get("rope_theta", theta),
                rope_scaling=rope,
                max_seq_len=cfg.get("max_position_embeddings", 2048),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=qwen2,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=[] if eos is None else eos if isinstance(eos, list) else [eos],
                name=cfg.get("_name_or_path", ""),
                sliding_window=_hf_sliding_window(cfg),
            )

    @classmethod
    def from_meta(cls, params: dict[str, Any], vocab_size: int) -> "ModelConfig":
        """From a Meta params.json; vocab_size comes from the weights when params says -1."""
        _require(params, ("dim", "n_layers", "n_heads"), "params.json")
        with _named_by(_META_KEYS):
            dim, n_heads = _count(params["dim"], "dim"), params["n_heads"]
            ffn_dim = params.get("hidden_dim")
            if ffn_dim is None:  # Meta's FeedForward sizing rule
                ffn_dim = int(2 * 4 * dim / 3)
                if params.get("ffn_dim_multiplier") is not None:
                    ffn_dim = int(_positive_number(params["ffn_dim_multiplier"], "ffn_dim_multiplier") * ffn_dim)
                multiple_of = _count(params.get("multiple_of", 256), "multiple_of")
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
                vocab_size=vocab_size if vocab is None or vocab == -1 else vocab,
                ffn_dim=ffn_dim,
                norm_eps=params.get("norm_eps", 1e-5),
                rope_theta=params.get("rope_theta", 10000.0),
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
        rope_scaling, scaling = None, get("rope.scaling.type", "none")
        if scaling == "linear":
            rope_scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
        elif scaling != "none":  # (Llama 3.1's scaling travels as the rope_freqs tensor, with no type here)
            raise UnsupportedModelError(f"{arch}.rope.scaling.type {scaling!r} is not supported (none, linear)")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        tokens = meta.get("tokenizer.ggml.tokens")
        with _named_by({**{field: f"{arch}.{key}" for field, key in _GGUF_KEYS.items()}, **_GGUF_TOKENIZER_KEYS}):
            return cls(
                dim=get("embedding_length"),
                n_layers=get("block_count"),
                n_heads=n_heads,
                n_kv_heads=get("attention.head_count_kv") or n_heads,
                vocab_size=get("vocab_size") or (len(tokens) if isinstance(tokens, list) else None),
                ffn_dim=get("feed_forward_length"),
                head_dim=get("attention.key_length") or get("rope.dimension_count") or 0,
                norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
                rope_theta=get("rope.freq_base", 10000.0),
                rope_scaling=rope_scaling,
                max_seq_len=get("context_length", 2048),
                bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
                eos_token_ids=[] if eos is None else [eos],
                name=meta.get("general.name", ""),
                sliding_window=get("attention.sliding_window"),
            )


def check_shapes(weights: dict[str, Any], config: ModelConfig, path: str) -> None:
    """Every tensor `config` needs is in `weights` (name -> anything with a .shape: tensors, a GGUF's header
    entries), in its shape, and nothing else is (CheckpointError naming the file and the tensors)."""
    c = config
    expected = {"tok_embeddings.weight": (c.vocab_size, c.dim), "norm.weight": (c.dim,)}
    if not c.tie_embeddings:
        expected["output.weight"] = (c.vocab_size, c.dim)
    for i in range(c.n_layers):
        p = f"layers.{i}."
        expected.update({
            p + "attention_norm.weight": (c.dim,),
            p + "ffn_norm.weight": (c.dim,),
            p + "attention.wq.weight": (c.n_heads * c.head_dim, c.dim),
            p + "attention.wk.weight": (c.n_kv_heads * c.head_dim, c.dim),
            p + "attention.wv.weight": (c.n_kv_heads * c.head_dim, c.dim),
            p + "attention.wo.weight": (c.dim, c.n_heads * c.head_dim),
            **({p + "attention.wq.bias": (c.n_heads * c.head_dim,),
                p + "attention.wk.bias": (c.n_kv_heads * c.head_dim,),
                p + "attention.wv.bias": (c.n_kv_heads * c.head_dim,)} if c.qkv_bias else {}),
            p + "feed_forward.w1.weight": (c.ffn_dim, c.dim),
            p + "feed_forward.w2.weight": (c.dim, c.ffn_dim),
            p + "feed_forward.w3.weight": (c.ffn_dim, c.dim),
        })
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:  # (more layers than the config says, biases it has none of, ...)
        raise CheckpointError(f"{path}: tensors the config has no place for: {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(weights[name].shape)}, expected {shape}")


_HF_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_HF_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")
# ModelConfig field -> the key it comes from, per format (for errors: _named_by); GGUF's under "{arch}.".
_HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "ffn_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
            "max_seq_len": "max_position_embeddings", "eos_token_ids": "eos_token_id"}
_META_KEYS = {"ffn_dim": "hidden_dim", "rope_scaling.factor": "rope_scaling_factor"}
_GGUF_KEYS = {"dim": "embedding_length", "n_layers": "block_count", "n_heads": "attention.head_count",
              "n_kv_heads": "attention.head_count_kv", "vocab_size": "vocab_size", "ffn_dim": "feed_forward_length",
              "head_dim": "attention.key_length", "norm_eps": "attention.layer_norm_rms_epsilon",
              "rope_theta": "rope.freq_base", "rope_scaling.factor": "rope.scaling.factor",
              "max_seq_len": "context_length", "sliding_window": "attention.sliding_window"}
_GGUF_TOKENIZER_KEYS = {"bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_ids": "tokenizer.ggml.eos_token_id"}
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
    n_layers = _count(cfg["num_hidden_layers"], "n_layers")
    kinds = cfg.get("layer_types")
    if kinds is None and "max_window_layers" in cfg:  # Qwen2: layers from max_window_layers on slide
        first = _count(cfg["max_window_layers"], "max_window_layers", minimum=0)
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if kinds is not None:
        if not isinstance(kinds, list):
            raise ConfigValueError("layer_types", f"must be a list of each layer's attention, got {kinds!r}")
        sliding = [kind == "sliding_attention" for kind in kinds]
        if not any(sliding):
            return None
        if not all(sliding):
            raise UnsupportedModelError(f"config.json slides the attention window on some layers only ({kinds}): "
                                        "not supported")
    return window
