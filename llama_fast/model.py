"""The LLaMA decoder: embeddings -> n_layers x (RMSNorm, span-biased GQA attention with RoPE, RMSNorm,
SwiGLU MLP) -> RMSNorm -> logits. Every op goes through llama_fast.ops, which picks the implementation.

Weight names follow Meta's checkpoints (tok_embeddings, layers.N.attention.wq, ...); loaders map the other
formats onto them. Q/K rows are in rotate-half (Hugging Face) order: loaders convert interleaved ones.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .config import ModelConfig
from .mapping import FileMappings, drop_pages
from .quant import QuantizedWeight
from .reference import rope_cos_sin_cache, sink_position
from .span import SpanBias


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, residual=None):
        """-> (normed, new residual): the norm of x + residual (of x alone when residual is None)."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps), x
        return ops.rms_norm(x, self.weight, self.eps, residual)


class QuantizedLinear(nn.Module):
    """A projection whose matrix is packed (llama_fast.quant: a GGUF block format, CUDA's int8 / int4) and
    multiplied as stored: `weight` is the packed matrix (ops.linear takes it like a tensor), `bias` the
    replaced Linear's."""

    def __init__(self, weight, bias: nn.Parameter | None):
        super().__init__()
        self.weight, self.bias = weight, bias


class QuantizedEmbedding(nn.Module):
    """The token embedding in a GGUF block format: rows dequantized as they are looked up."""

    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        self.weight = weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(tokens)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x, cache, positions, cos_sin_cache, span: SpanBias):
        B, T, _ = x.shape
        q = self._project(x, self.wq).view(B, T, self.n_heads, self.head_dim)
        k = self._project(x, self.wk).view(B, T, self.n_kv_heads, self.head_dim)
        v = self._project(x, self.wv).view(B, T, self.n_kv_heads, self.head_dim)
        q_sink = None
        if span.has_sinks:  # the queries as the sinks past the window see them
            q_sink = q.clone()
            ops.apply_rope(q_sink, q_sink[:, :, :0], sink_position(positions, span), cos_sin_cache)
        ops.apply_rope(q, k, positions, cos_sin_cache)
        cache.write(self.layer, k, v)
        out = ops.decode_attention(  # (B, T, n_heads, head_dim)
            q, cache.k[self.layer], cache.v[self.layer], cache.step_seqlens, span, cache.block_table, q_sink=q_sink
        )
        return ops.linear(out.reshape(B, T, -1), self.wo.weight)

    @staticmethod
    def _project(x, proj: nn.Linear):
        out = ops.linear(x, proj.weight)
        return out if proj.bias is None else out + proj.bias


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)  # down
        self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)  # up

    def forward(self, x):
        return ops.linear(ops.swiglu(ops.linear(x, self.w1.weight), ops.linear(x, self.w3.weight)), self.w2.weight)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, residual, cache, positions, cos_sin_cache, span):
        # The residual stream is carried separately so each norm can fuse the preceding add.
        h, residual = self.attention_norm(x, residual)
        h = self.attention(h, cache, positions, cos_sin_cache, span)
        h, residual = self.ffn_norm(h, residual)
        return self.feed_forward(h), residual


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, span: SpanBias = SpanBias()):
        super().__init__()
        span.check_heads(config.n_heads)
        self.config, self.span = config, span
        # Given its weight, nn.Embedding skips its random init (whose meta-device version imports sympy:
        # seconds of cold start); every weight is loaded after construction anyway.
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, _weight=torch.empty(config.vocab_size, config.dim))
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.cos_sin_cache = torch.empty(0, config.head_dim)  # (positions, head_dim), grown on demand

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and KV cache's) dtype: the weights', float32 where matrices are in block formats."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def quantized_weights(self) -> dict:
        """Model name -> packed matrix (llama_fast.quant) of every such weight (they are not in the state dict)."""
        return {f"{name}.weight": m.weight for name, m in self.named_modules()
                if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}

    def rope_table(self, num_positions: int, device) -> torch.Tensor:
        """[cos | sin] for positions 0..num_positions-1 (at least), fp32 on `device`."""
        if self.cos_sin_cache.shape[0] < num_positions or self.cos_sin_cache.device != torch.device(device):
            # streams run past the context: grow by doubling, not one position per step
            size = max(num_positions, self.config.max_seq_len, 2 * self.cos_sin_cache.shape[0])
            self.cos_sin_cache = rope_cos_sin_cache(
                size, self.config.head_dim, self.config.rope_theta, self.config.rope_scaling
            ).to(device)
        return self.cos_sin_cache

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache, last_only: bool = False, num_kept=None) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, vocab) fp32 (or (B, 1, vocab) for last_only).

        The new tokens' K/V are appended to `cache`; num_kept (B,) says how many of each row's T tokens
        are real (the rest is right padding), and last_only then returns each row's last real token.
        """
        span = self.span
        B, T = tokens.shape
        positions = cache.begin_step(T)  # (B, T)
        cos_sin = self.rope_table(cache.position_bound, tokens.device)  # (no device read: graph-safe)
        x = self.tok_embeddings(tokens)  # (B, T, dim)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cache, positions, cos_sin, span)
        cache.end_step(num_kept)
        if last_only:
            last = (torch.full((B,), T) if num_kept is None else torch.as_tensor(num_kept)) - 1
            x, residual = x[torch.arange(B), last.long()][:, None], residual[torch.arange(B), last.long()][:, None]
        x, _ = self.norm(x, residual)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return ops.linear(x, weight).float()


def build_model(config: ModelConfig, weights: dict[str, torch.Tensor], *, dtype=torch.float32, device="cpu",
                span: SpanBias = SpanBias()) -> Transformer:
    """A Transformer holding `weights` (model names) in `dtype` on `device`, without a second full copy.
    Matrices in GGUF block formats (QuantizedWeight) stay as they are, in QuantizedLinear / QuantizedEmbedding
    modules (CPU only); the other weights are then in float32 whatever `dtype` says."""
    with torch.device("meta"):
        model = Transformer(config, span)
    blocks = install_blocks(model, weights, device)
    if blocks:
        dtype = torch.float32
    mapped = FileMappings()
    state = {name: own_weight(w, w, dtype, device, mapped) for name, w in weights.items() if name not in blocks}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def install_blocks(model: Transformer, weights: dict, device) -> dict[str, QuantizedWeight]:
    """Puts each matrix of `weights` in a GGUF block format (QuantizedWeight) into `model`, in a
    QuantizedLinear (keeping the replaced module's bias) or QuantizedEmbedding; -> those weights. They run
    on the CPU only."""
    blocks = {name: w for name, w in weights.items() if isinstance(w, QuantizedWeight)}
    if blocks and torch.device(device).type != "cpu":
        raise ValueError(f"weights in GGUF block formats run on the CPU, not {device} (on CUDA: int8 / int4)")
    for name, w in blocks.items():
        owner = name.removesuffix(".weight")
        module = model.get_submodule(owner)
        replaced = QuantizedEmbedding(w) if isinstance(module, (nn.Embedding, QuantizedEmbedding)) else QuantizedLinear(w, module.bias)
        parent, _, attr = owner.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, replaced)
    return blocks


def own_weight(source: torch.Tensor, part: torch.Tensor, dtype: torch.dtype, device, mapped: FileMappings) -> torch.Tensor:
    """`part` (`source` itself or a slice of it) as a weight of its own in `dtype` on `device`: `part` itself
    where it is one already (the whole source, or a view of a mapped file, whose pages are read only when
    used), else a contiguous copy, after which a mapped source's pages are dropped: converting a mapped
    checkpoint never holds a tensor's pages and its copy together."""
    storage = source.untyped_storage()
    in_file = mapped.holds(storage.data_ptr(), storage.nbytes())
    if (part.dtype == dtype and part.device == torch.device(device) and part.is_contiguous()
            and (in_file or part is source)):
        return part
    copy = part.to(device=device, dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    if in_file:
        drop_pages(source.data_ptr(), source.numel() * source.element_size())
    return copy


def pack_weights(model: Transformer, kind: str) -> None:
    """Every projection matrix of `model` (the layers' and an untied output; not the embedding) packed on
    its device as CUDA's weight-only `kind` ("int8", "int4": llama_fast.quant.weight_only), the float copy
    freed as each is packed."""
    from .quant import weight_only

    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        linear = model.get_submodule(name)
        packed = QuantizedLinear(weight_only(linear.weight.detach(), kind), linear.bias)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, packed)
