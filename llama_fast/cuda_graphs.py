"""Decode steps over a PagedKVCache replayed from CUDA graphs (the gpt-fast recipe, on vLLM's paged layout):
one launch per step instead of ~400 kernel launches, each paying Python and launch overhead.

A graph bakes in the addresses of every tensor it touches and may not read the device from the host. So the
host does a step's bookkeeping (eviction, blocks, copy-on-write: PagedKVCache.reserve / commit), writes what the
step needs into static buffers (token ids, positions, block table, lengths, the pool slot of each new
token), and replays a graph that runs the model's forward through GraphStep, a cache whose step protocol
reads only those buffers. One graph per (batch bucket, block-table width bucket): a batch is padded to the
next power of two with rows that write into the cache's scratch block, so a handful of graphs cover every
batch; a graph is captured the first time its shape steps.

    graphs = PagedDecodeGraphs(model, cache)    # cache: a PagedKVCache with scratch_block=True
    cache.set_batch(seqs)
    logits = graphs.step(tokens, cache)         # (B,) -> (B, vocab) fp32, one token per sequence
"""
from __future__ import annotations

import torch


def bucket(n: int, smallest: int = 1) -> int:
    """The next power of two >= n (and >= smallest): the sizes graphs are captured for."""
    size = smallest
    while size < n:
        size *= 2
    return size


class GraphStep:
    """The cache protocol of one captured decode step, over static buffers (see the module docstring):
    `batch` rows of one token, block tables `width` blocks wide, positions below `position_bound`."""

    def __init__(self, cache, batch: int, width: int, position_bound: int):
        device = cache.k[0].device
        self.k, self.v, self.position_bound = cache.k, cache.v, position_bound
        self.tokens = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.positions = torch.zeros(batch, 1, dtype=torch.int64, device=device)
        self.slots = torch.zeros(batch, dtype=torch.int64, device=device)  # pool row of each new token
        self.step_seqlens = torch.ones(batch, dtype=torch.int32, device=device)
        self.block_table = torch.zeros(batch, width, dtype=torch.int32, device=device)

    def fill(self, tokens: torch.Tensor, start: torch.Tensor, true_start: torch.Tensor, table: torch.Tensor,
             scratch: int, block_size: int) -> None:
        """Loads one step into the buffers: rows of (token, start index, true position, block table row);
        the rows past them read and write the scratch block only."""
        B, n = self.tokens.shape[0], tokens.shape[0]
        # one host tensor, one upload: columns token, true position, length, pool slot, block table
        rows = torch.zeros(B, 4 + self.block_table.shape[1], dtype=torch.int64)
        rows[:, 2] = 1  # length of a padding row: its one token
        rows[:, 3] = scratch * block_size
        rows[:, 4:] = scratch
        rows[:n, 0] = tokens
        rows[:n, 1] = true_start
        rows[:n, 2] = start.long() + 1
        blocks = table.long().gather(1, (start.long() // block_size)[:, None])[:, 0]
        rows[:n, 3] = blocks * block_size + start.long() % block_size
        rows[:n, 4:4 + table.shape[1]] = table
        rows = rows.to(self.tokens.device, non_blocking=True)
        self.tokens.copy_(rows[:, :1])
        self.positions.copy_(rows[:, 1:2])
        self.step_seqlens.copy_(rows[:, 2])
        self.slots.copy_(rows[:, 3])
        self.block_table.copy_(rows[:, 4:])

    # the cache protocol (cache.py), reading and writing nothing but the buffers and the pools
    def begin_step(self, num_new: int) -> torch.Tensor:
        return self.positions

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for pool, new in ((self.k[layer], k), (self.v[layer], v)):
            pool.view(-1, *pool.shape[2:]).index_copy_(0, self.slots, new.reshape(-1, *pool.shape[2:]).to(pool.dtype))

    def end_step(self, num_kept=None) -> None:
        pass


class PagedDecodeGraphs:
    """One-token decode steps of `model` over a PagedKVCache; see the module docstring. On a CUDA device the
    steps replay captured graphs; elsewhere (tests) they run the same GraphStep eagerly."""

    def __init__(self, model, cache, *, warmup_steps: int = 2):
        if cache.k[0].shape[0] != cache.num_blocks + 1:
            raise ValueError("PagedDecodeGraphs needs a PagedKVCache made with scratch_block=True")
        self.model, self.warmup_steps = model, warmup_steps
        self.capture = model.device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple[GraphStep, object, torch.Tensor]] = {}
        self._table = None  # the RoPE table the graphs read (a larger one means capturing again)
        self.captures = 0  # graphs captured so far

    def step(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """tokens (B,) int64, one per sequence of cache's current batch -> logits (B, vocab) fp32; the new
        K/V go into the cache, which advances by one token per sequence."""
        start, true_start = cache.reserve(1)
        try:
            table = cache.manager.block_table(cache.seq_ids)
            B = len(cache.seq_ids)
            bound = bucket(int(true_start.max()) + 1, self.model.config.max_seq_len)
            rope = self.model.rope_table(bound, self.model.device)
            if rope is not self._table:  # the graphs captured so far read a table that is gone
                self._graphs.clear()
                self._table = rope
            key = (bucket(B), bucket(table.shape[1]))
            fresh = key not in self._graphs
            step = GraphStep(cache, *key, position_bound=rope.shape[0]) if fresh else self._graphs[key][0]
            step.fill(tokens, start, true_start, table, cache.num_blocks, cache.block_size)
            if fresh:
                self._graphs[key] = self._build(step)
            step, graph, logits = self._graphs[key]
            if graph is not None:
                graph.replay()
            else:
                logits = self.model(step.tokens, step)[:, -1]
        except BaseException:
            cache.commit([0] * len(cache.seq_ids))
            raise
        cache.commit([1] * B)
        return logits[:B]

    def _build(self, step: GraphStep):
        """(step, graph, its logits buffer), the graph captured after warm-up runs on a side stream (Triton
        compiles, allocator pools fill); without CUDA (step, None, None): the step runs eagerly."""
        if not self.capture:
            return step, None, None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # runs the step itself: writes what the replay writes again
            for _ in range(self.warmup_steps):
                self.model(step.tokens, step)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.model(step.tokens, step)[:, -1]  # (B, vocab)
        self.captures += 1
        return step, graph, logits
