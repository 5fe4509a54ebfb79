"""llama_fast under Hugging Face `transformers` code, each a one-line change:

    import llama_fast.integrations.transformers as lf_hf     # registers the "llama_fast" attention
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="llama_fast")
    llm = LLM.from_transformers(model, tokenizer)            # the same weights (shared) on the fast decode path
    lf_hf.accelerate(model)                                  # model.generate(...) now decodes on llama_fast

Importing this module imports transformers (an optional dependency: `import llama_fast` never does).

Attention ("llama_fast" in AttentionInterface): where transformers passes no mask (plain causal, no padding)
the attention runs through llama_fast.ops.decode_attention (the C++ attention on CPU, Triton on CUDA, the
choice ops makes for every op); with a padding or other explicit mask it runs reference.masked_attention,
the exact reference. Both apply the module's `sliding_window` and `softcap` (as the model class passes
them) and the SpanBias in `config.llama_fast_span`. The span's positions are the key indices of the KV
tensors counted from each row's first key any query sees, so left padding does not move a row's sinks.
Sinks past a window meet the query rotated at its sink position (docs/ARCHITECTURE.md section 3), as in
llama_fast's own model: transformers rotated the queries at their positions, so they are rotated back by
the difference (RoPE rotations compose).
"""
from __future__ import annotations

import functools
import math
import weakref

import torch
from transformers import AttentionInterface, GenerationConfig
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import ops, reference
from ..config import ModelConfig, check_shapes
from ..loaders import hf_tensor_name
from ..model import Transformer, build_model
from ..sampling import SamplingParams, row_params
from ..span import SpanBias
from ..tokenizer import Tokenizer, TokenizerError, _HFBackend

ATTENTION_NAME = "llama_fast"
SUPPORTED_CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# ----------------------------------------------------------------------------------------------------
# The attention function


def _span_for(module, sliding_window: int | None, softcap: float | None) -> SpanBias:
    """config.llama_fast_span with the module's own sliding window and softcap folded in."""
    config = getattr(module, "config", None)
    span = getattr(config, "llama_fast_span", None) or SpanBias()
    if not isinstance(span, SpanBias):
        raise TypeError(f"config.llama_fast_span must be a llama_fast.SpanBias, got {type(span).__name__}")
    if getattr(config, "num_attention_heads", None):
        span.check_heads(config.num_attention_heads)
    if softcap is not None and span.logit_softcap is not None and softcap != span.logit_softcap:
        raise ValueError(f"the model's attention softcap {softcap} differs from config.llama_fast_span.logit_softcap "
                         f"{span.logit_softcap}; set one of them")
    if sliding_window is not None and span.sink_tokens:
        raise ValueError(f"config.sliding_window ({sliding_window}) masks the sink tokens of config.llama_fast_span; "
                         "set the window on one of them")
    window = span.window
    if sliding_window is not None:  # a key is visible when both windows let it in: the narrower one
        window = sliding_window if window is None else min(window, sliding_window)
    if window == span.window and (softcap is None or softcap == span.logit_softcap):
        return span
    return SpanBias(span.alibi_slopes, span.bucket_bias, span.num_buckets, span.max_distance, window,
                    span.sink_tokens, softcap if softcap is not None else span.logit_softcap)


def _mask_positions(mask: torch.Tensor, q_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_pos (B, Tq), k_pos (B, Tk)) for the span from a (B, 1 or H, Tq, Tk) mask: key j sits at
    j - (the row's first key any query sees), a query where its last visible key is (its own: the mask is
    causal), or bottom-right aligned when it sees none (its output is zero anyway)."""
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min
    visible = visible.any(1)  # (B, Tq, Tk)
    B, Tq, Tk = visible.shape
    keys = torch.arange(Tk, device=mask.device)
    seen = visible.any(1)  # (B, Tk)
    first = torch.where(seen.any(1), seen.int().argmax(1), 0)  # (B,)
    last = torch.where(visible, keys, -1).amax(-1)  # (B, Tq)
    last = torch.where(last >= 0, last, torch.arange(Tk - q_len, Tk, device=mask.device))
    return last - first[:, None], keys[None, :] - first[:, None]


_ROPE_CONFIGS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # attention module -> ModelConfig


def _rope_config(module) -> ModelConfig:
    """The ModelConfig of an attention module's transformers config (its RoPE settings), parsed once per
    module, not at every call (transformers configs are unhashable: the module keys the cache)."""
    config = _ROPE_CONFIGS.get(module)
    if config is None:
        config = _ROPE_CONFIGS[module] = ModelConfig.from_hf(module.config.to_dict())
    return config


def _sink_queries(module, q: torch.Tensor, q_pos: torch.Tensor, span: SpanBias) -> torch.Tensor | None:
    """q (B, Tq, H, D), which transformers rotated at q_pos ((B, Tq) or (Tq,)), rotated instead at
    sink_position(q_pos): back by the difference. None for a span without sinks."""
    if not span.has_sinks:
        return None
    config = _rope_config(module)
    shift = (q_pos - reference.sink_position(q_pos, span)).expand(q.shape[:2])  # (B, Tq) >= 0
    cos, sin = reference.rope_cos_sin_cache(int(shift.max()) + 1, config.head_dim, config.rope_theta,
                                            config.rope_scaling).to(q.device).chunk(2, dim=-1)
    q_sink = q.clone()
    ops.apply_rope(q_sink, q_sink[:, :, :0], shift, torch.cat([cos, -sin], dim=-1))  # a rotation by -shift
    return q_sink


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, sliding_window: int | None = None, softcap: float | None = None,
                      **kwargs):
    """transformers' attention interface: query (B, H, Tq, D), key and value (B, Hkv, Tk, D), attention_mask
    None or (B, 1, Tq, Tk) -> (attention output (B, Tq, H, D), None)."""
    if dropout:
        raise ValueError(f"the llama_fast attention has no dropout (got dropout={dropout}); call model.eval()")
    if not (is_causal if is_causal is not None else getattr(module, "is_causal", True)):
        raise ValueError(f"the llama_fast attention is causal; {type(module).__name__} is not")
    span = _span_for(module, sliding_window, softcap)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2).contiguous(), value.transpose(1, 2).contiguous()
    Tq, Tk = q.shape[1], k.shape[1]
    differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if attention_mask is None and not differentiable:
        q = q.contiguous()
        # As "sdpa" reads no mask with more keys than queries: a prompt in an empty static cache, whose
        # first Tq keys are the prompt's.
        length = Tq if 1 < Tq < Tk else Tk
        q_sink = _sink_queries(module, q, torch.arange(length - Tq, length, device=q.device), span)
        if q.device.type == "cuda" and Tq == Tk:
            return ops.span_attention(q, k, v, span, scaling, q_sink=q_sink), None
        seqlens = torch.full((q.shape[0],), length, dtype=torch.int32, device=q.device)
        return ops.decode_attention(q, k, v, seqlens, span, scale=scaling, q_sink=q_sink), None
    if attention_mask is None:  # autograd: the reference (which ops' C++ and Triton versions are not)
        attention_mask = torch.ones(1, 1, Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
    q_pos, k_pos = _mask_positions(attention_mask, Tq)
    q_sink = _sink_queries(module, q, q_pos, span)
    return reference.masked_attention(q, k, v, attention_mask, q_pos, k_pos, span, scaling, q_sink), None


def register() -> None:
    """Registers "llama_fast" with transformers (done on import; calling it again is harmless). Masks are
    built as for "sdpa": None where plain causal attention is meant, else a boolean (B, 1, Tq, Tk)."""
    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


register()

# ----------------------------------------------------------------------------------------------------
# A transformers model as a llama_fast Transformer (weights shared)


def to_llama_fast(model) -> Transformer:
    """A llama_fast Transformer on `model`'s own weight tensors (nothing copied): LlamaForCausalLM,
    MistralForCausalLM or Qwen2ForCausalLM; anything else raises ValueError naming it."""
    name = type(model).__name__
    if name not in SUPPORTED_CLASSES:
        raise ValueError(f"llama_fast runs {', '.join(SUPPORTED_CLASSES)}; got a {name}")
    hf_config = model.config
    config = ModelConfig.from_hf(hf_config.to_dict())   # (a window on some layers only: refused there)
    # Tied when lm_head holds the embedding's very tensor (config says tied, but an lm_head replaced since is not).
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    config.tie_embeddings = head.data_ptr() == embedding.data_ptr() and head.shape == embedding.shape
    weights, ignored = {}, []
    for key, tensor in model.state_dict().items():  # detached views of the parameters: nothing copied
        target = hf_tensor_name(key)
        if target is None:
            ignored.append(key)
        elif not (target == "output.weight" and config.tie_embeddings):  # a tied lm_head is the embedding
            weights[target] = tensor
    if ignored:
        raise ValueError(f"{name}: tensors llama_fast has no place for: {ignored[:5]}{' ...' if len(ignored) > 5 else ''}")
    check_shapes(weights, config, name)  # (a CheckpointError: a ValueError naming the tensor)
    dtypes = {t.dtype for t in weights.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"{name}: weights must share one floating dtype, got {sorted(map(str, dtypes))}")
    devices = {t.device for t in weights.values()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        raise ValueError(f"{name}: weights must be loaded on one device, got {sorted(map(str, devices))}")
    span = getattr(hf_config, "llama_fast_span", None) or SpanBias(window=config.sliding_window)
    return build_model(config, weights, dtype=next(iter(dtypes)), device=next(iter(devices)), span=span)


class MissingTokenizer:
    """The tokenizer of an LLM built from a transformers model without one: token ids work, text raises."""

    has_text = False   # (LLM.generate then gives token ids only, and stream refuses)

    def __init__(self, eos_ids, vocab_size: int):
        self.eos_ids, self.vocab_size = set(eos_ids), vocab_size

    def _refuse(self, *args, **kwargs):
        raise TokenizerError("this LLM came from LLM.from_transformers(model) without a tokenizer: pass "
                             "tokenizer= (the model's transformers tokenizer) to use text")

    encode = decode = apply_chat_template = token = _refuse


def to_llama_fast_tokenizer(tokenizer) -> Tokenizer:
    """A llama_fast Tokenizer over a transformers fast tokenizer's own `tokenizers` backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer: a transformers fast tokenizer is needed, got {type(tokenizer).__name__}")
    from tokenizers import decoders

    bos = tokenizer.bos_token_id
    add_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    kind = "bpe" if isinstance(backend.decoder, decoders.ByteLevel) else "sentencepiece"
    return Tokenizer(_HFBackend(backend), kind=kind, bos_id=bos, eos_id=tokenizer.eos_token_id, add_bos=add_bos,
                     chat_template=getattr(tokenizer, "chat_template", None),
                     template_ids={"pad_token": tokenizer.pad_token_id, "unk_token": tokenizer.unk_token_id})


def llm_parts(model, tokenizer=None) -> tuple[Transformer, Tokenizer | MissingTokenizer]:
    """(Transformer, tokenizer) for LLM.from_transformers."""
    transformer = to_llama_fast(model)
    eos = _as_list(getattr(model.generation_config, "eos_token_id", None)) or transformer.config.eos_token_ids
    transformer.config.eos_token_ids = eos
    tok = MissingTokenizer(eos, transformer.config.vocab_size) if tokenizer is None else to_llama_fast_tokenizer(tokenizer)
    return transformer, tok


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, torch.Tensor):
        return [int(i) for i in ids.flatten().tolist()]
    return [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]


# ----------------------------------------------------------------------------------------------------
# generate


# GenerationConfig fields generate() honours, and those that cannot change its result.
HONOURED = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "min_p",
            "repetition_penalty", "eos_token_id", "pad_token_id", "num_return_sequences"}
NO_EFFECT = {"use_cache", "cache_implementation", "cache_config", "max_cache_len", "compile_config", "disable_compile",
             "bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config", "low_memory",
             "prefill_chunk_size", "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
             "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
             "length_penalty", "early_stopping"}  # (the last two act on beam search only)


def _llm_for(model):
    """The LLM generate() runs `model` on, sharing its weights: built once, and again whenever a weight was
    replaced rather than changed in place (a new Parameter, `param.data = ...`, model.to(dtype)), which the
    shared tensors would not see."""
    weights = tuple((p.data_ptr(), p.dtype, p.device) for p in model.parameters())
    built = model.__dict__.get("_llama_fast_llm")
    if built is None or built[0] != weights:
        from ..llm import LLM

        built = weights, LLM.from_transformers(model)
        model.__dict__["_llama_fast_llm"] = built
    return built[1]


def _settings(model, kwargs: dict) -> GenerationConfig:
    """The model's GenerationConfig (or the one passed) updated with kwargs; raises ValueError naming each
    keyword or setting generate() cannot honour."""
    import copy

    # As transformers: the config passed, its unset fields from the model's, then the keywords.
    config = copy.deepcopy(kwargs.pop("generation_config", None) or model.generation_config)
    config.update(**model.generation_config.to_dict(), defaults_only=True)
    unused = config.update(**kwargs)
    if unused:
        raise ValueError(f"llama_fast generate cannot honour {', '.join(sorted(unused))}")
    defaults = GenerationConfig._get_default_generation_params()
    for name, value in vars(config).items():
        if name in HONOURED or name in NO_EFFECT or name.startswith("_"):
            continue
        default = defaults.get(name)
        if value is not None and value != default and not (default is None and not value):  # (False, 0: unset)
            raise ValueError(f"llama_fast generate cannot honour {name}={value!r}")
    return config


def _get(config: GenerationConfig, name: str):
    value = getattr(config, name)
    return GenerationConfig._get_default_generation_params().get(name) if value is None else value


def generate(model, input_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """`model.generate(input_ids, **kwargs)` decoded by llama_fast: the token ids (B * num_return_sequences,
    T + new) with the prompt, finished rows padded with pad_token_id, as transformers returns them.

    Honours max_new_tokens, max_length, do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
    eos_token_id, pad_token_id, attention_mask (left padding) and num_return_sequences, from kwargs or the
    model's generation_config; anything else that would change the result raises ValueError naming it.
    Sampling draws its seed from torch's global generator (torch.manual_seed makes it repeatable).
    """
    attention_mask = kwargs.pop("attention_mask", None)
    if "inputs" in kwargs:   # (GenerationMixin.generate's first parameter is named inputs)
        if input_ids is not None:
            raise ValueError("generate takes input_ids or inputs, not both")
        input_ids = kwargs.pop("inputs")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an integer tensor (batch, length), got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {tuple(getattr(input_ids, 'shape', ()))}")
    config = _settings(model, kwargs)
    B, T = input_ids.shape
    eos = _as_list(config.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    n = _get(config, "num_return_sequences")
    do_sample = bool(_get(config, "do_sample"))
    if n > 1 and not do_sample:
        raise ValueError(f"num_return_sequences={n} needs do_sample=True (greedy rows would be identical)")
    if n < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {n}")
    if config.max_new_tokens is not None:
        max_new = config.max_new_tokens
    elif config.max_length is None:  # as transformers: its default max_length in new tokens, within the positions
        positions = getattr(model.config, "max_position_embeddings", None)
        max_new = min(_get(config, "max_length"), positions - T if positions is not None else math.inf)
        if max_new <= 0:
            raise ValueError(f"the {T} input_ids fill the model's {positions} positions; set max_new_tokens")
    else:
        max_new = config.max_length - T
        if max_new <= 0:
            raise ValueError(f"max_length={config.max_length} leaves no room after the {T} input_ids; "
                             "set max_new_tokens")
    inferred = ""
    if attention_mask is None:   # (inferred as transformers infers it)
        if pad is not None and pad not in eos and bool((input_ids == pad).any()):
            attention_mask, inferred = input_ids != pad, f" (none was passed: it is input_ids != pad_token_id {pad})"
        else:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask must have the shape of input_ids {(B, T)}, got {tuple(attention_mask.shape)}")
    keep = attention_mask.bool().cpu()
    lengths = keep.sum(1)
    if bool((lengths == 0).any()) or not bool((keep == (torch.arange(T) >= (T - lengths)[:, None])).all()):
        raise ValueError(f"attention_mask{inferred}: each row must be a non-empty prompt with padding on the left only")
    repetition_penalty = float(_get(config, "repetition_penalty"))
    if repetition_penalty != 1.0 and bool((lengths < T).any()):
        raise ValueError("repetition_penalty with left-padded rows: transformers penalises the pad token too "
                         "(it is in input_ids), llama_fast only the prompt; run such rows unpadded")
    llm = _llm_for(model)
    context = llm.config.max_seq_len
    if llm.model.span.window is None and int(lengths.max()) + max_new > context:
        raise ValueError(f"max_new_tokens={max_new} runs past the model's context of {context} tokens")
    ids = input_ids.cpu()
    prompts = [ids[b, T - int(lengths[b]):].tolist() for b in range(B) for _ in range(n)]
    settings = dict(temperature=0.0)
    if do_sample:
        temperature = float(_get(config, "temperature"))
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive number when sampling, got {temperature}")
        settings = dict(temperature=temperature, top_k=int(_get(config, "top_k") or 0),
                        top_p=float(_get(config, "top_p")), min_p=float(config.min_p or 0.0))
    settings["repetition_penalty"] = repetition_penalty
    seed = int(torch.randint(0, 2**62, ())) if do_sample else 0
    params = row_params(len(prompts), seed, **settings)
    new_tokens = _decode(llm, prompts, params, max_new, set(eos), pad)
    rows = ids.repeat_interleave(n, dim=0)
    return torch.cat([rows, torch.tensor(new_tokens, dtype=rows.dtype).reshape(len(prompts), -1)], 1).to(input_ids.device)


def _decode(llm, prompts: list[list[int]], params: list[SamplingParams], max_new: int, eos: set[int],
            pad: int | None) -> list[list[int]]:
    """Each row's new tokens, until it samples an EOS token (kept) or max_new; rows done early are padded."""
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in llm.generate_ids(prompts, params, max_new, stop_at_eos=False):
        for r, token in enumerate(step):
            if token is not None and not done[r]:  # (None: the row has no token this step)
                out[r].append(token)
                done[r] = token in eos or len(out[r]) == max_new
        if all(done):
            break
    longest = max(len(row) for row in out)
    return [row + [pad] * (longest - len(row)) for row in out]  # (pad is None only when no row ends early)


def accelerate(model):
    """Makes `model.generate` this module's generate (for this model object only) and returns the model.
    Raises ValueError at once for a model llama_fast cannot run."""
    _llm_for(model)
    model.generate = functools.partial(generate, model)
    return model
