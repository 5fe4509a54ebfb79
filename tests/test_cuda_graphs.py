"""CUDA-graph decoding (llama_fast.cuda_graphs): what can be checked without a GPU, and the real thing
where one is present.

A captured step must not read the device from the host (a sync is an error during capture, and a value
read then would be baked into the graph). This machine has no GPU, so the capture itself is checked on
GPU machines only (the last test here, and benchmarks/gpu_decode.py in gpu_suite.sh); on CPU the tests
check that GraphStaticKVCache computes what StaticKVCache does, and that a decode step through it,
with the Triton kernels (interpreted) and their host-side checks switched off as under capture
(kernels._common.sync_point patched: the one stand-in here), dispatches no op that reads a device value
(`aten._local_scalar_dense`: item(), int(), bool() of a tensor) or uploads host data (`aten.lift_fresh`:
torch.tensor(list)).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama_fast.cache import CacheFullError, GraphStaticKVCache, StaticKVCache
from llama_fast.config import ModelConfig
from llama_fast.cuda_graphs import CudaGraphDecodePath, cache_bucket
from models import random_model

TINY = ModelConfig(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=64, ffn_dim=160, vocab_size=97,
                   max_seq_len=64)


def both_caches(cfg, batch, length):
    args = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    return StaticKVCache(*args), GraphStaticKVCache(*args)


def test_graph_cache_computes_what_the_static_cache_does(smollm):
    model, cfg = smollm.model, smollm.config
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
    tokens = torch.tensor([p + [0] * (7 - len(p)) for p in prompts])
    lengths = torch.tensor([7, 3])
    static, graph = both_caches(cfg, 2, 32)
    want = model(tokens, static, last_only=True, num_kept=lengths)
    got = model(tokens, graph, last_only=True, num_kept=lengths)
    torch.testing.assert_close(got, want)
    for step in range(5):
        next_tokens = want[:, -1].argmax(-1)[:, None]  # (B, 1)
        want, got = model(next_tokens, static), model(next_tokens, graph)
        torch.testing.assert_close(got, want)
        assert graph.lengths() == static.lengths() == graph.seqlens.tolist()
    for layer in range(cfg.n_layers):
        for b, n in enumerate(static.lengths()):
            torch.testing.assert_close(graph.k[layer][b, :n], static.k[layer][b, :n])


def test_graph_cache_keeps_its_storage_and_checks_capacity_on_the_host():
    cfg = TINY
    cache = GraphStaticKVCache(cfg.n_layers, 1, 4, cfg.n_kv_heads, cfg.head_dim)
    seqlens = cache.seqlens
    model = random_model(cfg)
    model(torch.tensor([[1, 2, 3]]), cache)
    model(torch.tensor([[4]]), cache)
    assert cache.seqlens is seqlens and cache.lengths() == [4]  # advanced in place: a graph still sees it
    with pytest.raises(CacheFullError, match="holds 4 tokens"):
        model(torch.tensor([[5]]), cache)
    cache.reset()
    assert cache.seqlens is seqlens and cache.lengths() == [0] and seqlens.tolist() == [0]


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
    model = random_model(TINY)
    cache = GraphStaticKVCache(TINY.n_layers, 2, 16, TINY.n_kv_heads, TINY.head_dim)
    model(torch.tensor([[5, 6, 7], [8, 9, 10]]), cache)  # prefill: host checks allowed
    with DeviceReads() as reads:  # outside capture the kernels check their inputs on the host: seen
        model(torch.tensor([[1], [2]]), cache)
    assert reads.seen
    for module in {common.__name__, "llama_fast.kernels.rope", "llama_fast.kernels.decode_attention"}:
        monkeypatch.setattr(f"{module}.sync_point", lambda: False, raising=False)
    tokens = torch.tensor([[3], [4]])
    with DeviceReads() as reads:
        logits = model(tokens, cache)
    assert reads.seen == [], f"a decode step read the device: {reads.seen}"
    assert logits.shape == (2, 1, TINY.vocab_size) and cache.lengths() == [5, 5]


def test_cache_bucket():
    assert [cache_bucket(n) for n in (1, 256, 257, 1000, 5000)] == [256, 256, 512, 1024, 8192]


def test_graph_path_needs_a_cuda_model():
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphDecodePath(random_model(TINY))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs in benchmarks/gpu_suite.sh)")
def test_graph_decoding_equals_eager_on_gpu():
    from llama_fast import LLM

    eager = LLM.from_pretrained(device="cuda", dtype=torch.float16, progress=False, decode="eager")
    graphs = LLM.from_pretrained(device="cuda", dtype=torch.float16, progress=False)
    for prompt in ("I love", "The capital of France is"):
        assert graphs.generate(prompt, max_new_tokens=48).token_ids == eager.generate(prompt, max_new_tokens=48).token_ids
    assert graphs._graph_path.captures == 1  # both prompts fit one (batch 1, bucket) graph
