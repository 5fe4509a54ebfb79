"""The CPU runner: a C++ decode session (csrc/core/session.h) over a model's weights, used in place.

One step runs any mix of prompt chunks and decode tokens of many sequences in one pass over the weights,
on a paged KV cache the session owns (fork shares a prompt's blocks; a window frees the blocks it made
invisible). A sequence's logits are the same, bit for bit, alone or in any batch, however its prompt was
chunked: what the batch-invariance tests check.

    runner = SessionRunner(model, num_blocks=...)
    seq = runner.add_sequence()
    logits = runner.step([(seq, prompt_ids)])        # (1, vocab): after the prompt's last token
    twin = runner.fork(seq)
    logits = runner.step([(seq, [a]), (twin, [b])])  # (2, vocab)
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

import importlib

from . import rope
from .reference import bucket_table

BLOCK_SIZE = 16  # tokens per KV block


class Runner(Protocol):
    """What the Engine and its scheduler need of a route from token ids to logits over a paged KV cache
    (SessionRunner: the C++ session on CPU; model_runner.ModelRunner: the model's forward, CUDA and eager)."""

    num_blocks: int
    prefix_caching: bool

    def add_sequence(self) -> int: ...
    def fork(self, seq: int) -> int: ...
    def free(self, seq: int) -> None: ...
    def match_prefix(self, seq: int, tokens: Sequence[int]) -> int: ...
    def blocks_needed(self, entries: Sequence[tuple[int, int]]) -> int: ...
    def blocks_for_sequence(self, tokens: int, step_tokens: int) -> int: ...
    def step(self, entries: Sequence[tuple[int, Sequence[int]]], all_logits: bool = False) -> torch.Tensor: ...
    @property
    def num_free_blocks(self) -> int: ...
    @property
    def num_cached_blocks(self) -> int: ...


def supports(model) -> str | None:
    """None if the C++ session can run `model`, else the reason it cannot."""
    if model.device.type != "cpu":
        return f"the model is on {model.device.type}"
    dtypes = {p.dtype for p in model.parameters() if p.dim() == 2}
    if not dtypes <= {torch.float32, torch.bfloat16}:
        return f"matrices are {sorted(map(str, dtypes))} (float32, bfloat16 and GGUF block formats are supported)"
    try:
        _lite()
    except ImportError as err:
        return f"llama_fast._lite (the C++ session) does not load: {err}"
    return None


def _lite():
    return importlib.import_module("llama_fast._lite")


def blocks_for_sequence(tokens: int, step_tokens: int, window: int, sinks: int, block_size: int = BLOCK_SIZE) -> int:
    """The most KV blocks a sequence of `tokens` tokens holds, fed at most step_tokens at a time, on either
    runner (one block manager, csrc/core/block_manager.h): all of them, or under a window what eviction leaves
    (the sinks, window - 1 tokens and less than a block more) plus a step's."""
    return _lite().blocks_for_sequence(tokens, step_tokens, window, sinks, block_size)


def weight_map(model) -> tuple[dict, list[torch.Tensor]]:
    """name -> (address, dtype, shape) of every weight (contiguous, as stored: nothing copied; a matrix in a
    GGUF block format as its blocks, its type's name and its (rows, cols)), and the tensors that own that
    memory."""
    names = {torch.float32: "F32", torch.bfloat16: "BF16"}
    weights, owners = {}, []
    for name, t in model.state_dict().items():
        t = t.detach()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.dtype not in names:
            t = t.float()  # (a norm weight in another dtype; the session reads norms as fp32)
        owners.append(t)
        weights[name] = (t.data_ptr(), names[t.dtype], list(t.shape))
    for name, w in model.quantized_weights().items():
        data = w.data.contiguous()
        owners.append(data)
        weights[name] = (data.data_ptr(), w.qtype, list(w.shape))
    return weights, owners


class SessionRunner:
    """A C++ session (llama_fast._lite.Session, the session's one binding: it needs no torch) over `model`'s weights and SpanBias, with a KV pool of
    num_blocks blocks of BLOCK_SIZE tokens. num_threads 0: torch's thread count. prefix_caching: full blocks
    stay findable by content (match_prefix) until the pool needs them."""

    def __init__(self, model, *, num_blocks: int, num_threads: int = 0, isa: str = "auto", prefix_caching: bool = False):
        reason = supports(model)
        if reason is not None:
            raise ValueError(f"the C++ session cannot run this model: {reason}")
        c, span = model.config, model.span  # (a tensor-parallel shard's: its heads, its FFN slice)
        self.tp = getattr(model, "tp", None)
        weights, self._owners = weight_map(model)
        slopes = [] if span.alibi_slopes is None else span.alibi_slopes.detach().float().cpu().tolist()
        table = bucket_table(span)
        self._session = _lite().Session(
            n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
            norm_eps=c.norm_eps, max_positions=c.max_seq_len, weights=weights, owner=self._owners,
            inv_freq=rope.inv_freq(c.head_dim, c.rope_theta, c.rope_scaling), alibi_slopes=slopes,
            bucket_table=[] if table is None else table.float().flatten().tolist(),
            window=span.window or 0, sinks=span.sink_tokens, logit_softcap=span.logit_softcap or 0.0,
            scale=0.0, num_blocks=num_blocks, block_size=BLOCK_SIZE,
            kv_dtype="BF16" if model.dtype == torch.bfloat16 else "F32",
            num_threads=num_threads or torch.get_num_threads(), isa=isa, prefix_caching=prefix_caching)
        if self.tp is not None:
            self._session.set_all_reduce(self.tp.all_reduce)
        self.vocab = c.vocab_size
        self.kv_bytes = num_blocks * BLOCK_SIZE * 2 * c.n_layers * c.n_kv_heads * c.head_dim * model.dtype.itemsize

    @property
    def isa(self) -> str:
        return self._session.isa

    @property
    def num_threads(self) -> int:
        return self._session.num_threads

    @num_threads.setter
    def num_threads(self, n: int) -> None:
        self._session.num_threads = n

    @property
    def num_blocks(self) -> int:
        return self._session.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks a step can take (cached ones no sequence holds included)."""
        return self._session.num_free_blocks

    @property
    def prefix_caching(self) -> bool:
        return self._session.prefix_caching

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks that still hold a findable prefix."""
        return self._session.num_cached_blocks

    def match_prefix(self, seq: int, tokens: Sequence[int]) -> int:
        """Starts the empty sequence seq from the cached blocks of tokens' longest cached prefix (whole
        blocks, at least one token left to compute); returns the tokens it now holds."""
        return self._session.match_prefix(seq, [int(t) for t in tokens])

    def blocks_needed(self, entries: Sequence[tuple[int, int]]) -> int:
        """Blocks a step of (sequence, new token count) entries would take from the pool."""
        return self._session.blocks_needed([seq for seq, _ in entries], [count for _, count in entries])

    def add_sequence(self) -> int:
        return self._session.add_sequence()

    def fork(self, seq: int) -> int:
        return self._session.fork(seq)

    def free(self, seq: int) -> None:
        self._session.free(seq)

    def length(self, seq: int) -> int:
        return self._session.length(seq)

    def blocks_held(self, seq: int) -> int:
        return self._session.blocks_held(seq)

    def blocks_for_sequence(self, tokens: int, step_tokens: int) -> int:
        """The most blocks a sequence of `tokens` tokens holds, fed at most step_tokens at a time."""
        return self._session.blocks_for_sequence(tokens, step_tokens)

    def step(self, entries: Sequence[tuple[int, Sequence[int]]], all_logits: bool = False) -> torch.Tensor:
        """entries: (sequence, its new token ids) each; returns (len(entries), vocab) fp32 logits after each
        one's last token, or (all new tokens, vocab) with all_logits."""
        seqs = [seq for seq, _ in entries]
        counts = [len(ids) for _, ids in entries]
        tokens = [int(t) for _, ids in entries for t in ids]
        logits = torch.from_numpy(self._session.step(seqs, counts, tokens, all_logits))
        return logits if self.tp is None else self.tp.gather_vocab(logits)
