"""The runner of the PyTorch model: the Runner (llama_fast.session) the Engine steps wherever the C++ session
does not run (CUDA; decode="eager", the reference route; weights the session does not take), over a
PagedKVCache.

A step's entries run in groups of equal token counts (all the decode rows in one forward pass, each prompt
chunk length in its own), so no row is padded to another's length. On CUDA a group of single tokens
replays a CUDA graph (cuda_graphs.PagedDecodeGraphs) instead of launching the forward's kernels one by one.
Prefix caching is the session's alone: match_prefix finds nothing here.

    runner = ModelRunner(model, num_blocks=...)
    seq = runner.add_sequence()
    logits = runner.step([(seq, prompt_ids)])        # (1, vocab) fp32 on the CPU
"""
from __future__ import annotations

from typing import Sequence

import torch

from .cache import PagedKVCache
from .session import BLOCK_SIZE, blocks_for_sequence


class ModelRunner:
    """`model`'s forward over a PagedKVCache of num_blocks blocks; see the module docstring. graphs: replay
    decode steps from CUDA graphs (default: on a CUDA model)."""

    prefix_caching = False
    num_cached_blocks = 0

    def __init__(self, model, *, num_blocks: int, graphs: bool | None = None):
        c, span = model.config, model.span
        self.model, self.span = model, span
        graphs = model.device.type == "cuda" if graphs is None else graphs
        self.cache = PagedKVCache.for_span(c.n_layers, num_blocks, BLOCK_SIZE, c.n_kv_heads, c.head_dim, span,
                                           dtype=model.dtype, device=model.device, scratch_block=graphs,
                                           max_seq_len=None if span.window is not None else c.max_seq_len)
        self.graphs = None
        if graphs:
            from .cuda_graphs import PagedDecodeGraphs

            self.graphs = PagedDecodeGraphs(model, self.cache)
        self.kv_bytes = sum(t.numel() * t.element_size() for t in self.cache.k + self.cache.v)

    @property
    def isa(self) -> str:
        return f"torch {self.model.device.type}" + (" + CUDA graphs" if self.graphs is not None else "")

    @property
    def num_blocks(self) -> int:
        return self.cache.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.cache.num_free_blocks

    def add_sequence(self) -> int:
        return self.cache.add_sequence()

    def fork(self, seq: int) -> int:
        return self.cache.fork(seq)

    def free(self, seq: int) -> None:
        self.cache.free(seq)

    def length(self, seq: int) -> int:
        """Tokens the sequence has been fed (evicted ones included), as the session counts them."""
        return self.cache.length(seq) + self.cache.evicted(seq)

    def match_prefix(self, seq: int, tokens: Sequence[int]) -> int:
        return 0

    def blocks_needed(self, entries: Sequence[tuple[int, int]]) -> int:
        """Blocks a step of (sequence, new token count) entries would take from the pool (their invisible
        tokens evicted first: that changes no number)."""
        need = 0
        for count, members in _groups([count for _, count in entries]).items():
            seqs = [entries[i][0] for i in members]
            self.cache.evict_invisible(seqs)
            need += self.cache.blocks_needed(seqs, count)
        return need

    def blocks_for_sequence(self, tokens: int, step_tokens: int) -> int:
        return blocks_for_sequence(tokens, step_tokens, self.span.window or 0, self.span.sink_tokens)

    def step(self, entries: Sequence[tuple[int, Sequence[int]]], all_logits: bool = False) -> torch.Tensor:
        """entries: (sequence, its new token ids) each; returns (len(entries), vocab) fp32 CPU logits after
        each one's last token, or (all new tokens, vocab) with all_logits."""
        rows: list[torch.Tensor | None] = [None] * len(entries)
        device = self.model.device
        for count, members in _groups([len(ids) for _, ids in entries]).items():
            seqs = [entries[i][0] for i in members]
            tokens = torch.tensor([list(entries[i][1]) for i in members], dtype=torch.int64)  # (b, count)
            self.cache.set_batch(seqs)
            if count == 1 and self.graphs is not None and not all_logits:
                logits = self.graphs.step(tokens[:, 0], self.cache)[:, None]  # (b, 1, vocab)
            else:
                logits = self.model(tokens.to(device), self.cache, last_only=not all_logits)
            for j, i in enumerate(members):
                rows[i] = logits[j]
        return torch.cat(rows).float().cpu()


def _groups(counts: Sequence[int]) -> dict[int, list[int]]:
    """Token count -> the indices of the entries that feed that many (the forward passes of one step)."""
    groups: dict[int, list[int]] = {}
    for i, count in enumerate(counts):
        groups.setdefault(count, []).append(i)
    return groups
