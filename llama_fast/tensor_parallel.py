"""Tensor parallelism over torch.distributed, Megatron-style as gpt-fast's tp.py does it.

Each rank holds a slice of every layer: its query heads' rows of wq and columns of wo, the KV heads those
query heads read (split across the ranks when the world size divides them evenly, replicated where it does
not, as vLLM does), its share of the FFN's gate/up rows and down columns, and its slice of the output
projection's vocabulary. Norms and the embedding are replicated. A layer's two output projections
(attention's wo, the FFN's w2) give partial sums that one all-reduce each adds up; the logits' vocabulary
slices are gathered at the end. So each rank's KV cache holds only its heads, and every rank computes the
same logits and samples the same tokens: all ranks run the same generation (SPMD; rank 0 prints).

On CPU each rank runs the C++ session on its shard, the all-reduce called from inside its step (backend
gloo). CUDA (NCCL, CUDA graphs) is not wired yet: a model on CUDA is refused.

    torchrun --nproc-per-node 2 -m llama_fast generate "Hello" --tp 2
    LLM.from_pretrained(name, tensor_parallel=2)   # inside a torchrun job (or RANK/WORLD_SIZE/MASTER_* set)
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_TIMEOUT_S = 60.0  # a dead peer surfaces as an error after this, not after gloo's 30 minutes


@dataclass(frozen=True)
class ShardPlan:
    """What rank `rank` of `world` holds (global head indices)."""

    rank: int
    world: int
    q_heads: range
    kv_heads: tuple[int, ...]  # the global KV head of each local one
    ffn: range  # rows of w1 / w3, columns of w2
    vocab: range  # rows of the output projection


def plan_shard(config, world: int, rank: int) -> ShardPlan:
    """The slices of rank `rank`; raises ValueError when the query heads do not divide by the world size."""
    H, Hkv = config.n_heads, config.n_kv_heads
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"tensor parallelism: rank {rank} of a world of {world}")
    if H % world:
        raise ValueError(f"tensor_parallel={world} must divide the model's {H} query heads")
    per = H // world
    q_heads = range(rank * per, (rank + 1) * per)
    group = H // Hkv
    needed = [h // group for h in q_heads]  # the KV head each local query head reads (non-decreasing)
    kv = sorted(set(needed))
    # The session groups query heads evenly over its KV heads; where this rank's query heads do not fall
    # evenly into their KV heads, each gets its own copy of its KV head.
    if len({needed.count(k) for k in kv}) != 1:
        kv = needed
    return ShardPlan(rank, world, q_heads, tuple(kv), _even(config.ffn_dim, world, rank),
                     _even(config.vocab_size, world, rank))


def _even(n: int, world: int, rank: int) -> range:
    return range(rank * n // world, (rank + 1) * n // world)


def shard_weights(state: dict[str, torch.Tensor], config, plan: ShardPlan) -> dict[str, torch.Tensor]:
    """This rank's weights under the model's names (each its own contiguous copy, so the full weights can
    be freed): local heads, FFN and vocabulary slices; norms and the embedding whole."""
    D = config.head_dim
    q_rows = slice(plan.q_heads.start * D, plan.q_heads.stop * D)
    kv_rows = torch.tensor([k * D + i for k in plan.kv_heads for i in range(D)])
    ffn = slice(plan.ffn.start, plan.ffn.stop)
    out = {}
    for name, w in state.items():
        w = w.detach()
        if name.endswith(("attention.wq.weight", "attention.wq.bias")):
            w = w[q_rows]
        elif name.endswith(("attention.wk.weight", "attention.wv.weight", "attention.wk.bias", "attention.wv.bias")):
            w = w.index_select(0, kv_rows)
        elif name.endswith("attention.wo.weight"):
            w = w[:, q_rows]
        elif name.endswith(("feed_forward.w1.weight", "feed_forward.w3.weight")):
            w = w[ffn]
        elif name.endswith("feed_forward.w2.weight"):
            w = w[:, ffn]
        out[name] = w.contiguous().clone() if w.is_contiguous() else w.contiguous()
    output = state.get("output.weight", state["tok_embeddings.weight"])  # tied: the embedding's rows
    out["output.weight"] = output.detach()[plan.vocab.start:plan.vocab.stop].clone()
    return out


def init_process_group(world: int, timeout_s: float = DEFAULT_TIMEOUT_S, backend: str = "gloo"):
    """Joins (or checks) the default process group of `world` ranks, from torchrun's environment
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); the collective timeout is timeout_s."""
    import torch.distributed as dist

    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ValueError(f"tensor_parallel={world} needs a torchrun job (or {', '.join(missing)} set): "
                             f"torchrun --nproc-per-node {world} -m llama_fast ...")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if dist.get_world_size() != world:
        raise ValueError(f"tensor_parallel={world}, but the process group has {dist.get_world_size()} ranks")
    return dist.get_rank()


class TensorParallel:
    """One rank's shard of a model and the collectives its session step calls (set as model.tp)."""

    def __init__(self, model, world: int, rank: int):
        import torch.distributed as dist

        self.dist = dist
        self.config = model.config
        self.plan = plan_shard(model.config, world, rank)
        self.weights = shard_weights(model.state_dict(), model.config, self.plan)
        sizes = [len(_even(model.config.vocab_size, world, r)) for r in range(world)]
        self._vocab_sizes = sizes

    @property
    def n_heads(self) -> int:
        return len(self.plan.q_heads)

    @property
    def n_kv_heads(self) -> int:
        return len(self.plan.kv_heads)

    def local_heads(self, per_head: torch.Tensor | None) -> torch.Tensor | None:
        """A per-head table (alibi slopes, bucket biases) cut to this rank's query heads."""
        return None if per_head is None else per_head[self.plan.q_heads.start:self.plan.q_heads.stop]

    def all_reduce(self, partial: np.ndarray) -> None:
        """Sums a float32 array over the ranks, in place (the session's hook)."""
        self.dist.all_reduce(torch.from_numpy(partial))

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """(rows, this rank's vocab slice) -> (rows, vocab): every rank's slices side by side."""
        widest = max(self._vocab_sizes)
        padded = torch.zeros(logits.shape[0], widest, dtype=logits.dtype)
        padded[:, :logits.shape[1]] = logits
        parts = [torch.empty_like(padded) for _ in self._vocab_sizes]
        self.dist.all_gather(parts, padded)
        return torch.cat([p[:, :n] for p, n in zip(parts, self._vocab_sizes)], dim=1)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())


def shard_model(model, world: int, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Makes `model` this rank's shard of a tensor-parallel group of `world` ranks (joining the process
    group): model.tp holds the shard, the full matrices are dropped (the model then runs only through the
    C++ session)."""
    if model.tok_embeddings.weight.device.type != "cpu":
        raise ValueError("tensor parallelism runs on CPU (the C++ session over gloo); CUDA is not wired yet")
    rank = init_process_group(world, timeout_s)
    model.tp = TensorParallel(model, world, rank)
    for name, param in model.named_parameters():
        if name != "tok_embeddings.weight" and param.dim() == 2:
            param.data = torch.empty(0, dtype=param.dtype)  # the shard has its part; free the rest
