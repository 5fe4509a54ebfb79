"""The fast CPU decode path: one C++ call per generated token (llama_fast._C.CpuDecoder, csrc/cpu_decode.h).

Eager PyTorch spends most of a CPU decode step in one-row matrix products that move 8-10 GB/s and in
per-op overhead (about 900 ops per token); the C++ step streams the weights at memory bandwidth and runs
the whole step (embedding, 30 layers, final norm, logits) in one OpenMP region. It computes exactly what
Transformer.forward computes for one new token per row (docs/ARCHITECTURE.md section 3 for the span bias), with
fp32 activations whatever the weight dtype (fp32 or bf16 weights; fp32 or bf16 KV cache).

    decoder = CpuDecodePath.for_model(model)         # None where it does not apply (see supports())
    logits = decoder.step(next_tokens, cache)        # (B,) int64 -> (B, vocab) fp32; appends K/V, advances cache
"""
from __future__ import annotations

import torch

from ._ext import ext
from .cache import CacheFullError, StaticKVCache
from .reference import bucket_table
from .threads import ThreadTuner

_CACHE_FULL = "llama_fast: KV cache full"


def supports(model) -> str | None:
    """None if the C++ decode step can run `model`, else the reason it cannot."""
    weight = model.tok_embeddings.weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device.type}"
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return f"weights are {weight.dtype} (float32 and bfloat16 are supported)"
    dtypes = {p.dtype for name, p in model.named_parameters() if p.dim() == 2}
    if len(dtypes) != 1:
        return f"the matrices mix dtypes {sorted(map(str, dtypes))}"
    try:
        ext()
    except ImportError as err:
        return str(err)
    return None


class CpuDecodePath:
    """Holds a C++ CpuDecoder built once from a model's weights (used in place, not copied).

    num_threads: 0 (default) chooses between torch's thread count and 1 by timing steps (ThreadTuner);
    a positive number fixes it. isa: "auto", "avx512", "avx2" or "scalar" (for tests).
    """

    def __init__(self, model, *, num_threads: int = 0, isa: str = "auto"):
        reason = supports(model)
        if reason is not None:
            raise ValueError(f"the C++ CPU decode step cannot run this model: {reason}")
        c, span = model.config, model.span
        layers = model.layers
        out = model.tok_embeddings.weight if model.output is None else model.output.weight
        self.model = model
        self._rope_rows = 0
        table = model.rope_table(c.max_seq_len, "cpu")
        self._decoder = ext().CpuDecoder(
            n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim, eps=c.norm_eps,
            embedding=model.tok_embeddings.weight.detach(), output=out.detach(), final_norm=model.norm.weight.detach(),
            attn_norm=[blk.attention_norm.weight.detach() for blk in layers],
            wq=[blk.attention.wq.weight.detach() for blk in layers],
            wk=[blk.attention.wk.weight.detach() for blk in layers],
            wv=[blk.attention.wv.weight.detach() for blk in layers],
            wo=[blk.attention.wo.weight.detach() for blk in layers],
            ffn_norm=[blk.ffn_norm.weight.detach() for blk in layers],
            w1=[blk.feed_forward.w1.weight.detach() for blk in layers],
            w2=[blk.feed_forward.w2.weight.detach() for blk in layers],
            w3=[blk.feed_forward.w3.weight.detach() for blk in layers],
            rope_table=table,
            alibi_slopes=None if span.alibi_slopes is None else span.alibi_slopes.detach().float().cpu(),
            bucket_table=bucket_table(span),
            window=span.window or 0, sink_tokens=span.sink_tokens, logit_softcap=span.logit_softcap or 0.0,
            scale=c.head_dim ** -0.5, num_threads=num_threads, isa=isa,
        )
        self._rope_rows = table.shape[0]
        threads = torch.get_num_threads()
        self._tuner = ThreadTuner([threads, 1]) if num_threads == 0 and threads > 1 else None

    @classmethod
    def for_model(cls, model, **kwargs) -> "CpuDecodePath | None":
        """The decode path for `model`, or None where the C++ step does not apply (a GPU model, no extension)."""
        if supports(model) is not None:
            return None
        return cls(model, **kwargs)

    @property
    def isa(self) -> str:
        return self._decoder.isa

    @property
    def num_threads(self) -> int:
        return self._decoder.num_threads

    def applies_to(self, cache) -> bool:
        """Whether step() can run on this cache: a contiguous StaticKVCache (or a StreamingKVCache over one)
        in a dtype the step reads."""
        from .streaming import StreamingKVCache

        if isinstance(cache, StreamingKVCache):
            cache = cache.base
        return isinstance(cache, StaticKVCache) and cache.block_table is None and cache.k[0].dtype in (
            torch.float32, torch.bfloat16)

    def step(self, tokens: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """tokens (B,) int64 (one new token per row) -> logits (B, vocab) fp32.

        Like model(tokens[:, None], cache)[:, -1]: the new K/V go into the cache at cache.seqlens, and the
        cache advances by one token per row (its seqlens tensor is updated in place).
        """
        if not isinstance(cache, StaticKVCache):  # a StreamingKVCache: evict as its begin_step does, then step
            with torch.inference_mode():  # as the model's forward, which owns these tensors
                cache.make_room(1)
            cache = cache.base
        if cache.max_seq_len > self._rope_rows:  # the model's RoPE table grows on demand; so does ours
            table = self.model.rope_table(cache.max_seq_len, "cpu")
            self._decoder.set_rope_table(table)
            self._rope_rows = table.shape[0]
        args = (tokens, cache.seqlens, cache.k, cache.v)
        try:
            if self._tuner is None:
                logits = self._decoder.step(*args)
            else:
                logits = self._tuner.run(self._decoder, self._decoder.step, *args)
        except RuntimeError as err:
            if str(err).startswith(_CACHE_FULL):
                raise CacheFullError(str(err).split("\n")[0]) from None
            raise
        cache.step_seqlens = cache.seqlens
        return logits
