"""CUDA-graph decoding (llama_fast.cuda_graphs): what can be checked without a GPU, and the real thing
where one is present.

A captured step must not read the device from the host (a sync is an error during capture, and a value
read then would be baked into the graph). This machine has no GPU, so the capture itself is checked on
GPU machines only (the last test here, and benchmarks/gpu_decode.py in gpu_suite.sh). On CPU the graph
path runs its GraphStep eagerly (what a replay runs), so the tests check that its steps compute what the
model's forward over the paged cache computes (padding rows, forks, eviction under a window), and that a
step through it, with the Triton kernels (interpreted) and their host-side checks switched off as under
capture (kernels._common.sync_point patched: the one stand-in here), dispatches no op that reads a device
value (`aten._local_scalar_dense`: item(), int(), bool() of a tensor) or uploads host data
(`aten.lift_fresh`: torch.tensor(list)).
"""
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama_fast import LLM, SamplingParams
from llama_fast.cache import PagedKVCache
from llama_fast.config import ModelConfig
from llama_fast.cuda_graphs import GraphStep, PagedDecodeGraphs, bucket
from llama_fast.model_runner import ModelRunner
from llama_fast.span import SpanBias
from models import random_model

TINY = ModelConfig(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=64, ffn_dim=160, vocab_size=97,
                   max_seq_len=64)


@pytest.mark.parametrize("span", [SpanBias(), SpanBias(window=24, sink_tokens=3)], ids=["causal", "window_sinks"])
def test_graph_steps_compute_what_the_forward_does(span):
    """Three sequences (a batch padded to four), one a fork of another, decoding past the context of a
    dense model's bucket and, under a window, far past the window (eviction between steps): the graph path's
    logits equal the model's forward over the paged cache, and both caches hold the same keys."""
    model = random_model(TINY, span, seed=1)
    runners = [ModelRunner(model, num_blocks=24, graphs=g) for g in (False, True)]
    assert runners[1].graphs is not None and not runners[1].graphs.capture  # (CPU: GraphStep runs eagerly)
    rng = random.Random(0)
    prompts = [[rng.randrange(TINY.vocab_size) for _ in range(n)] for n in (5, 19)]
    seqs, logits = [], []
    for runner in runners:
        s = [runner.add_sequence() for _ in prompts]
        logits.append([runner.step(list(zip(s, prompts)))])
        s.append(runner.fork(s[1]))  # shares the prompt's blocks: its first write copies the last one
        seqs.append(s)
    steps = 40 if span.window is not None else TINY.max_seq_len - 19 - 1
    for _ in range(steps):
        tokens = logits[0][-1].argmax(-1).tolist() + [7]
        for runner, s, out in zip(runners, seqs, logits):
            out.append(runner.step([(q, [t]) for q, t in zip(s, tokens)]))
    for eager, graph in zip(*logits):
        torch.testing.assert_close(graph, eager, atol=1e-5, rtol=1e-5)
    caches = [r.cache for r in runners]
    if span.window is not None:
        assert min(caches[0].evicted(s) for s in seqs[0]) > 0
    for a, b in zip(seqs[0], seqs[1]):
        assert caches[0].length(a) == caches[1].length(b)
        torch.testing.assert_close(caches[1].gather(b, 1)[0], caches[0].gather(a, 1)[0])


class DeviceReads(TorchDispatchMode):
    """Records dispatched ops that would read device values on the host or upload host data."""

    FORBIDDEN = {"aten._local_scalar_dense.default", "aten.lift_fresh.default", "aten.item.default"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in self.FORBIDDEN:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_decode_step_reads_nothing_from_the_device(monkeypatch):
    import llama_fast.kernels._common as common

    monkeypatch.setenv("LLAMA_FAST_BACKEND", "triton")  # interpreted on CPU tensors (TRITON_INTERPRET=1)
    model = random_model(TINY, SpanBias(window=8, sink_tokens=2))
    cache = PagedKVCache.for_span(TINY.n_layers, 8, 16, TINY.n_kv_heads, TINY.head_dim, model.span,
                                  scratch_block=True)
    seq = cache.add_sequence()
    cache.set_batch([seq])
    model(torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]), cache)  # a prompt: host checks allowed
    cache.set_batch([seq])
    start, true_start = cache.reserve(1)
    table = cache.manager.block_table([seq])
    step = GraphStep(cache, 2, 2, position_bound=model.rope_table(64, "cpu").shape[0])
    step.fill(torch.tensor([3]), start, true_start, table, cache.num_blocks, cache.block_size)
    with DeviceReads() as reads:  # outside capture the kernels check their inputs on the host: seen
        model(step.tokens, step)
    assert reads.seen
    for module in {common.__name__, "llama_fast.kernels.rope", "llama_fast.kernels.decode_attention"}:
        monkeypatch.setattr(f"{module}.sync_point", lambda: False, raising=False)
    with DeviceReads() as reads:
        logits = model(step.tokens, step)
    assert reads.seen == [], f"a decode step read the device: {reads.seen}"
    assert logits.shape == (2, 1, TINY.vocab_size)


def test_bucket():
    assert [bucket(n) for n in (1, 2, 3, 8, 9)] == [1, 2, 4, 8, 16]
    assert [bucket(n, 64) for n in (1, 64, 65)] == [64, 64, 128]


def test_graphs_need_a_scratch_block():
    model = random_model(TINY)
    cache = PagedKVCache(TINY.n_layers, 4, 16, TINY.n_kv_heads, TINY.head_dim)
    with pytest.raises(ValueError, match="scratch_block"):
        PagedDecodeGraphs(model, cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs in benchmarks/gpu_suite.sh)")
def test_graph_decoding_equals_eager_on_gpu():
    eager = LLM.from_pretrained(device="cuda", dtype=torch.float16, progress=False, decode="eager")
    graphs = LLM.from_pretrained(device="cuda", dtype=torch.float16, progress=False)
    greedy = [SamplingParams(temperature=0.0)]
    runners = []
    for prompt in ("I love", "The capital of France is"):
        ids = [graphs.tokenizer.encode(prompt)]
        assert list(graphs.generate_ids(ids, greedy, 48, on_cache=runners.append)) == list(eager.generate_ids(ids, greedy, 48))
    assert all(r.graphs is not None and r.graphs.captures >= 1 for r in runners)
