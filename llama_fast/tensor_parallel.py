"""Tensor parallelism over torch.distributed, Megatron-style as gpt-fast's tp.py does it.

Each rank holds a slice of every layer: its query heads' rows of wq and columns of wo, the KV heads those
query heads read (split across the ranks when the world size divides them evenly, replicated where it does
not, as vLLM does), its share of the FFN's gate/up rows and down columns, and its slice of the output
projection's vocabulary. Norms and the embedding are replicated. A layer's two output projections
(attention's wo, the FFN's w2) give partial sums that one all-reduce each adds up; the logits' vocabulary
slices are gathered at the end. So each rank's KV cache holds only its heads, and every rank computes the
same logits and samples the same tokens: all ranks run the same generation (SPMD; rank 0 prints).

A rank loads only its shard (load_shard): views of the mapped file where the checkpoint's layout allows,
only the shard converted where its dtype differs, and where loading had to hold more of the model than the
shard (a dequantised file, Meta's joined files) the shard goes to the cache, which later loads map.

On CPU each rank runs the C++ session on its shard, the all-reduce called from inside its step (backend
gloo). On CUDA each rank takes the GPU of its LOCAL_RANK (unless the device names one), the shard is cut on
the CPU from the mapped file and only it is moved to the GPU, and the model's forward runs with the
all-reduces as NCCL collectives, which the decode step's CUDA graphs capture like any other kernel.

    torchrun --nproc-per-node 2 -m llama_fast generate "Hello" --tp 2 [--device cuda]
    LLM.from_pretrained(name, tensor_parallel=2)   # inside a torchrun job (or RANK/WORLD_SIZE/MASTER_* set)
"""
from __future__ import annotations

import atexit
import dataclasses
import datetime
import json
import logging
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig
from .engine import Engine
from .loaders import load_checkpoint, read_weights, save_weights
from .mapping import FileMappings
from .model import Transformer, install_blocks, own_weight
from .paths import complete_entry, shard_cache_path, write_entry
from .quant import QuantizedWeight
from .span import SpanBias, checkpoint_span
from .tokenizer import Tokenizer

log = logging.getLogger("llama_fast")

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


def shard_weights(state: dict, config, plan: ShardPlan, dtype: torch.dtype | None = None) -> dict:
    """This rank's weights under the model's names, in `dtype` (None: as they are; matrices in a GGUF block
    format (QuantizedWeight) stay in it): local heads, FFN and vocabulary slices; norms and the embedding
    whole. Each tensor is taken out of `state` as it is cut, so weights in memory are freed as the shard
    grows (pass a copy of a dict to keep), and only the shard is converted (model.own_weight): a slice that
    is a range of rows of a tensor mapped from a file, in its dtype, stays a view of the map, so only the
    pages this rank reads are ever loaded (wq, wk, wv, w1, w3, the output's vocabulary, the embedding); any
    other is a contiguous copy (wo's and w2's columns; every slice of weights in memory, so that the full
    ones can be freed). A block format's columns are cut between its blocks only (ValueError otherwise)."""
    D = config.head_dim
    q_rows = slice(plan.q_heads.start * D, plan.q_heads.stop * D)
    kv = plan.kv_heads
    kv_rows = (slice(kv[0] * D, (kv[-1] + 1) * D) if kv == tuple(range(kv[0], kv[-1] + 1))
               else torch.tensor([k * D + i for k in kv for i in range(D)]))
    ffn = slice(plan.ffn.start, plan.ffn.stop)
    mapped = FileMappings()

    def keep(w, rows=None, cols: slice | None = None):
        """Rows `rows` and columns `cols` of w (None: all) as a weight of this rank's own."""
        if isinstance(w, QuantizedWeight):
            part = w.part(rows, None if cols is None else range(cols.start, cols.stop))
            return QuantizedWeight(own_weight(w.data, part.data, torch.uint8, "cpu", mapped), w.qtype, part.shape)
        w = w.detach()
        part = w if rows is None else w[rows]
        part = part if cols is None else part[:, cols]
        return own_weight(w, part, dtype or part.dtype, "cpu", mapped)

    def cut(name: str):
        """(rows, columns) of tensor `name` that this rank keeps (None: all)."""
        if name.endswith(("attention.wq.weight", "attention.wq.bias")):
            return q_rows, None
        if name.endswith(("attention.wk.weight", "attention.wv.weight", "attention.wk.bias", "attention.wv.bias")):
            return kv_rows, None
        if name.endswith("attention.wo.weight"):
            return None, q_rows
        if name.endswith(("feed_forward.w1.weight", "feed_forward.w3.weight")):
            return ffn, None
        if name.endswith("feed_forward.w2.weight"):
            return None, ffn
        return None, None

    output = state.pop("output.weight", state["tok_embeddings.weight"])  # tied: the embedding's rows
    out = {"output.weight": keep(output, rows=slice(plan.vocab.start, plan.vocab.stop))}
    del output
    for name in list(state):
        w = state.pop(name)
        try:
            out[name] = keep(w, *cut(name))
        except ValueError as err:  # a block format's columns cut through a block
            raise ValueError(f"{name}: {err}, at tensor_parallel={plan.world} (another world size or dtype "
                             "may fit)") from None
        del w
    return out


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: a CUDA device without an index is the GPU of the rank's LOCAL_RANK (torchrun sets it)."""
    if device.type != "cuda" or device.index is not None:
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init_process_group(world: int, timeout_s: float = DEFAULT_TIMEOUT_S, device: torch.device = torch.device("cpu")):
    """Joins (or checks) the default process group of `world` ranks, from torchrun's environment
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); the collective timeout is timeout_s. Backend gloo for a
    model on the CPU, NCCL for one on CUDA (its communicator made here, so that no CUDA graph capture
    is the first collective)."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ValueError(f"tensor_parallel={world} needs a torchrun job (or {', '.join(missing)} set): "
                             f"torchrun --nproc-per-node {world} -m llama_fast ...")
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "nccl":
            torch.cuda.set_device(device)
            dist.init_process_group(backend, timeout=timeout, device_id=device)
            dist.all_reduce(torch.zeros(1, device=device))
        else:
            dist.init_process_group(backend, timeout=timeout)
        # Left before the interpreter tears down what gloo's threads use (else a rank may abort at exit,
        # "terminate called without an active exception", after its work is done).
        atexit.register(leave_process_group)
    if dist.get_world_size() != world:
        raise ValueError(f"tensor_parallel={world}, but the process group has {dist.get_world_size()} ranks")
    if dist.get_backend() != backend:
        raise ValueError(f"tensor parallelism on {device.type} needs a {backend} process group, this one is "
                         f"{dist.get_backend()}")
    return dist.get_rank()


def leave_process_group() -> None:
    """Destroys this process's groups, if it joined any (at exit, when init_process_group made them): gloo's
    threads then stop before the interpreter tears down what they use. Local: no rank waits for another."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


class TensorParallel:
    """One rank's place in the group and the collectives its steps call (model.tp of a sharded model)."""

    def __init__(self, plan: ShardPlan, vocab_size: int):
        import torch.distributed as dist

        self.dist = dist
        self.plan = plan
        self._vocab_sizes = [len(_even(vocab_size, plan.world, r)) for r in range(plan.world)]

    def all_reduce(self, partial) -> None:
        """Sums a float32 array or tensor over the ranks, in place (the session's hook takes numpy)."""
        self.dist.all_reduce(torch.from_numpy(partial) if isinstance(partial, np.ndarray) else partial)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., this rank's vocab slice) -> (..., vocab): every rank's slices side by side."""
        lead, width = logits.shape[:-1], logits.shape[-1]
        flat = logits.reshape(-1, width)
        padded = flat.new_zeros(flat.shape[0], max(self._vocab_sizes))
        padded[:, :width] = flat
        parts = [torch.empty_like(padded) for _ in self._vocab_sizes]
        self.dist.all_gather(parts, padded)
        return torch.cat([p[:, :n] for p, n in zip(parts, self._vocab_sizes)], dim=1).reshape(*lead, -1)


def shard_model(model, world: int, *, timeout_s: float = DEFAULT_TIMEOUT_S, device=None) -> None:
    """Turns `model` (on the CPU) into this rank's shard of a tensor-parallel group of `world` ranks (joining
    the process group), on `device` (default the CPU; on CUDA only the shard is moved there): see
    become_shard."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if model.device.type != "cpu":
        raise ValueError(f"shard_model cuts the shard on the CPU (then moves it to {device}); the model is on "
                         f"{model.device}")
    rank = init_process_group(world, timeout_s, device)
    plan = plan_shard(model.config, world, rank)
    state = {**model.state_dict(), **model.quantized_weights()}
    become_shard(model, plan, shard_weights(state, model.config, plan), device)


def become_shard(model, plan: ShardPlan, weights: dict[str, torch.Tensor], device: torch.device) -> None:
    """Makes `model` (the whole model's modules, their weights on the CPU or the meta device) rank
    plan.rank's shard holding `weights` (shard_weights), on `device`: its modules keep only their slices (the
    full matrices are freed), model.config describes the local heads and FFN (the vocabulary stays whole:
    the logits are gathered), model.span its query heads' part, model.tp the collectives. Both routes run
    it: the C++ session (which calls the all-reduce from its step) and the model's forward (hooks after each
    wo and w2, and on the logits)."""
    config = model.config
    q = slice(plan.q_heads.start, plan.q_heads.stop)
    model.config = dataclasses.replace(config, n_heads=len(plan.q_heads), n_kv_heads=len(plan.kv_heads),
                                       ffn_dim=len(plan.ffn), tie_embeddings=False)
    model.span = dataclasses.replace(
        model.span, alibi_slopes=None if model.span.alibi_slopes is None else model.span.alibi_slopes[q].clone(),
        bucket_bias=None if model.span.bucket_bias is None else model.span.bucket_bias[q].clone())
    model.output = torch.nn.Linear(config.dim, len(plan.vocab), bias=False, device="meta")
    with torch.device("meta"):  # the shard's shapes: a model of the local heads and FFN, the vocabulary's slice
        shapes = {name: tuple(p.shape) for name, p in Transformer(model.config).named_parameters()}
    shapes["output.weight"] = (len(plan.vocab), config.dim)
    unexpected = sorted(set(weights) - shapes.keys())
    if unexpected:
        raise ValueError(f"the shard has tensors its model has no place for: {', '.join(unexpected[:3])}")
    wrong = [f"{name} {tuple(w.shape)} (expected {shapes[name]})" for name, w in weights.items() if tuple(w.shape) != shapes[name]]
    if wrong:
        raise ValueError(f"the shard's tensors have the wrong shapes: {', '.join(wrong[:3])}")
    blocks = install_blocks(model, weights, device)
    for name, w in weights.items():  # (load_state_dict would insist on the full shapes)
        if name not in blocks:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, torch.nn.Parameter(w, requires_grad=False))
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"the shard has no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    for layer in model.layers:
        layer.attention.n_heads, layer.attention.n_kv_heads = model.config.n_heads, model.config.n_kv_heads
    model.to(device)
    model.tp = tp = TensorParallel(plan, config.vocab_size)
    for layer in model.layers:  # the model's forward: the partial sums of wo and w2 summed over the ranks
        for module in (layer.attention, layer.feed_forward):
            module.register_forward_hook(lambda _m, _i, out: tp.all_reduce(out) or out)
    model.register_forward_hook(lambda _m, _i, logits: tp.gather_vocab(logits))


def load_shard(path: str, world: int, dtype: torch.dtype | None, span, *, device: torch.device,
               timeout_s: float = DEFAULT_TIMEOUT_S, progress: bool = True):
    """This rank's shard of the checkpoint at `path` in `dtype` (None: the checkpoint's default,
    Checkpoint.float_dtype), on `device`, joining the process group of `world` ranks: -> (model, tokenizer).
    It is cut from the checkpoint as it loads, only the shard converted (shard_weights), and where loading
    held more of the model in memory than the shard itself (a dequantised file without its cache, Meta's
    model-parallel files joined, ...) the shard is written to the cache; later loads map it and read nothing
    else (docs/tensor_parallel.md)."""
    rank = init_process_group(world, timeout_s, device)
    # (A block format loads as a mapped GGUF, the file's or its converted copy in the cache: no shard cache.)
    folder = None if isinstance(dtype, str) else shard_cache_path(path, dtype, world, rank)
    model = cached_shard(folder, world, rank, span, device)
    if model is not None:
        return model, Tokenizer.from_pretrained(path)
    ckpt = load_checkpoint(path, progress=progress, dtype=dtype)
    plan = plan_shard(ckpt.config, world, rank)
    held = bytes_in_memory(ckpt.weights) if folder is not None else 0
    weights = shard_weights(ckpt.weights, ckpt.config, plan, ckpt.float_dtype(dtype))  # (emptying ckpt.weights)
    if folder is not None and held > sum(w.nbytes for w in weights.values()):
        write_shard(folder, ckpt.config, weights)
    return _shard_of(ckpt.config, plan, weights, span, device), ckpt.tokenizer


def _shard_of(config, plan: ShardPlan, weights: dict[str, torch.Tensor], span, device: torch.device):
    """The model of `config` as the shard `plan` says, holding `weights` (become_shard)."""
    with torch.device("meta"):
        model = Transformer(config, checkpoint_span(span or SpanBias(), config.sliding_window))
    become_shard(model.eval(), plan, weights, device)
    return model


def bytes_in_memory(weights: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors in `weights` held in this process's memory rather than mapped from a file."""
    mapped, seen, total = FileMappings(), set(), 0
    for w in weights.values():
        storage = w.untyped_storage()
        if storage.data_ptr() not in seen and not mapped.holds(storage.data_ptr(), storage.nbytes()):
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def write_shard(folder: str, config, weights: dict[str, torch.Tensor]) -> None:
    """The shard cache entry: the whole model's config (JSON) and this rank's weights (safetensors)."""
    def write_config(part: str) -> None:
        with open(part, "w") as f:
            json.dump(dataclasses.asdict(config), f)

    write_entry(folder, {"config.json": write_config, "weights.safetensors": lambda part: save_weights(weights, part)})


def cached_shard(folder: str | None, world: int, rank: int, span, device: torch.device):
    """The shard model of a complete shard cache entry (its weights mapped), else None. A damaged entry (one
    that does not read, or reads but does not fit its model) is logged and removed: the caller makes it
    again."""
    if complete_entry(folder) is None:
        return None
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = ModelConfig(**json.load(f))
        weights = read_weights(os.path.join(folder, "weights.safetensors"))
        if weights is None:
            raise ValueError("its weights do not read")
        return _shard_of(config, plan_shard(config, world, rank), weights, span, device)
    except (OSError, ValueError, TypeError) as err:
        log.warning("llama_fast: ignoring the damaged cache entry %s (%s)", folder, err)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def shard_bytes(model) -> int:
    """Bytes of the weights this rank holds."""
    return (sum(t.numel() * t.element_size() for t in model.state_dict().values())
            + sum(w.nbytes for w in model.quantized_weights().values()))


# ---- serving: rank 0 runs the engine behind the server, the others repeat its steps ----

def control_group():
    """A gloo group for the engine's changes, without the collective timeout: the other ranks may wait for
    rank 0's next step as long as the server is idle. Every rank creates it, at the same point."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))


def _broadcast(ops, group):
    import torch.distributed as dist

    box = [ops]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class LeaderEngine(Engine):
    """Rank 0's Engine in a tensor-parallel server. Every change, a request added or aborted, reaches the
    other ranks (follow) before the step that first sees it, and aborts are applied at the start of a step
    on every rank alike: all engines hold the same state at every step, so they schedule the same batches
    (their collectives must match) and sample the same tokens. An abort frees its blocks at the next step."""

    def __init__(self, llm, **limits):
        super().__init__(llm, **limits)
        self._control = control_group()
        self._ops: list[tuple[str, object]] = []  # changes since the last step, for the other ranks
        self._aborting: set[str] = set()

    def add_request(self, *args, **kwargs) -> str:
        with self._lock:
            request_id = super().add_request(*args, **kwargs)
            r = self._requests[request_id]
            self._ops.append(("add", dict(
                prompt=r.prompt, params=[s.params for s in r.sequences], max_new_tokens=r.max_new_tokens,
                stop=r.stops, n=len(r.sequences), request_id=request_id, ignore_eos=r.ignore_eos,
                min_tokens=r.min_tokens, detokenize=r.sequences[0].text is not None)))
            return request_id

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id not in self._requests:
                raise ValueError(f"abort: no unfinished request with id {request_id!r}")
            if request_id not in self._aborting:
                self._aborting.add(request_id)
                self._ops.append(("abort", request_id))

    def _before_schedule(self) -> None:
        ops, self._ops = self._ops, []
        _broadcast(ops, self._control)
        _apply_aborts(lambda request_id: Engine.abort(self, request_id), ops)
        self._aborting.clear()

    def stop_followers(self) -> None:
        """Ends the other ranks' follow() loops (after the last step)."""
        with self._lock:
            _broadcast(None, self._control)


def _apply_aborts(abort, ops) -> None:
    for kind, request_id in ops:
        if kind == "abort":
            try:
                abort(request_id)
            except ValueError:
                pass  # it finished first: on every rank alike


def follow(llm, **limits) -> None:
    """The loop of a rank > 0 in a tensor-parallel server: its own Engine over its shard takes rank 0's
    changes and steps with it, until rank 0 says stop."""
    engine = Engine(llm, **{**limits, "max_waiting": None})
    control = control_group()
    while (ops := _broadcast(None, control)) is not None:
        for kind, arg in ops:
            if kind == "add":
                engine.add_request(**arg)
        _apply_aborts(engine.abort, ops)
        engine.step()
