"""The C++ CPU decode step (llama_fast.fast_decode, csrc/cpu_decode.h) against the PyTorch model.

Small random models cover every SpanBias variant, GQA ratios, odd sizes (vector tails), batches with
rows of different lengths and every ISA variant this CPU runs; the embedded SmolLM2 checks real logits
and greedy tokens. Bad input must raise, and a decode step must stay a handful of dispatched torch ops
(the regression guard: it fails if Python-level work creeps back into the step).
"""
import sys

import pytest
import torch

from llama_fast import _ext
from llama_fast.cache import CacheFullError, StaticKVCache
from llama_fast.config import ModelConfig
from llama_fast.model import Transformer, build_model
from llama_fast.reference import bucket_table, span_bucket
from llama_fast.span import SpanBias, alibi_slopes

pytestmark = pytest.mark.skipif(not _ext.has_ext(), reason="llama_fast._C is not built")

from llama_fast.fast_decode import CpuDecodePath  # noqa: E402


def supported_isas():
    f = _ext.ext().cpu_features()
    isas = ["scalar"]
    if f["avx2"] and f["fma"]:
        isas.append("avx2")
    if f["avx512f"] and f["avx512bw"]:
        isas.append("avx512")
    return isas


def random_model(cfg: ModelConfig, span: SpanBias = SpanBias(), *, seed=0, dtype=torch.float32, qk_gain=1.0):
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    weights = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # norm weights around 1
            weights[name] = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        else:
            w = torch.randn(shape, generator=gen) / shape[1] ** 0.5
            if name.endswith(("wq.weight", "wk.weight")):
                w = w * qk_gain
            weights[name] = w
    return build_model(cfg, weights, dtype=dtype, span=span)


def new_cache(cfg, batch, length, dtype=torch.float32):
    return StaticKVCache(cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim, dtype=dtype)


def prefill_both(model, prompts, capacity, dtype=torch.float32):
    """Two identical caches after the (PyTorch) prefill of right-padded prompts; returns them and the logits."""
    cfg = model.config
    lengths = torch.tensor([len(p) for p in prompts])
    longest = int(lengths.max())
    tokens = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])
    caches = []
    for _ in range(2):
        cache = new_cache(cfg, len(prompts), capacity, model.tok_embeddings.weight.dtype)
        logits = model(tokens, cache, last_only=True, num_kept=lengths)[:, -1]
        caches.append(cache)
    fast = caches[1]
    if fast.k[0].dtype != dtype:  # the C++ step's cache in another dtype than the model's (bf16 vs fp32)
        fast.k = [k.to(dtype) for k in fast.k]
        fast.v = [v.to(dtype) for v in fast.v]
    return caches, logits


def run_both(model, path, prompts, steps, *, capacity=None, cache_dtype=torch.float32, ref_model=None):
    """Decodes `steps` tokens with the reference model and with the C++ step from the same caches, feeding
    both the reference's greedy tokens; yields (reference logits, C++ logits, reference cache, C++ cache)."""
    ref_model = ref_model or model
    capacity = capacity or max(len(p) for p in prompts) + steps + 1
    (ref_cache, fast_cache), logits = prefill_both(model, prompts, capacity, cache_dtype)
    for _ in range(steps):
        tokens = logits.argmax(-1)  # (B,)
        ref = ref_model(tokens[:, None], ref_cache)[:, -1]
        fast = path.step(tokens, fast_cache)
        yield ref, fast, ref_cache, fast_cache
        logits = ref


SMALL = ModelConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=301, ffn_dim=160, head_dim=16,
                    max_seq_len=256, rope_theta=10000.0)


def span_variants(n_heads):
    gen = torch.Generator().manual_seed(1)
    buckets = torch.randn(n_heads, 8, generator=gen)
    return {
        "plain": SpanBias(),
        "alibi": SpanBias(alibi_slopes=alibi_slopes(n_heads)),
        "buckets": SpanBias(bucket_bias=buckets, num_buckets=8, max_distance=12),
        "window": SpanBias(window=5),
        "window_sinks": SpanBias(window=6, sink_tokens=2),
        "softcap": SpanBias(logit_softcap=2.0),
        "all": SpanBias(alibi_slopes=alibi_slopes(n_heads), bucket_bias=buckets, num_buckets=8, max_distance=12,
                        window=7, sink_tokens=3, logit_softcap=3.0),
    }


@pytest.mark.parametrize("variant", list(span_variants(6)))
@pytest.mark.parametrize("isa", supported_isas())
def test_span_variants_match_reference(variant, isa):
    span = span_variants(SMALL.n_heads)[variant]
    model = random_model(SMALL, span, qk_gain=3.0)
    path = CpuDecodePath(model, isa=isa)
    assert path.isa == isa
    prompts = [[3, 17, 250, 9, 44, 101, 7, 8, 9], [5, 6, 7, 300]]  # rows of different lengths
    for ref, fast, ref_cache, fast_cache in run_both(model, path, prompts, steps=20):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(fast_cache.seqlens, ref_cache.seqlens)
        assert fast_cache.step_seqlens is fast_cache.seqlens
    for layer in range(SMALL.n_layers):  # every K/V the step appended, in place
        for b, n in enumerate(ref_cache.seqlens.tolist()):
            torch.testing.assert_close(fast_cache.k[layer][b, :n], ref_cache.k[layer][b, :n], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(fast_cache.v[layer][b, :n], ref_cache.v[layer][b, :n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dims", [
    dict(dim=64, n_heads=1, n_kv_heads=1, head_dim=64, ffn_dim=128),   # head_dim 64, MHA
    dict(dim=100, n_heads=4, n_kv_heads=1, head_dim=128, ffn_dim=203),  # head_dim 128, GQA 4, odd sizes
    dict(dim=90, n_heads=6, n_kv_heads=2, head_dim=18, ffn_dim=77),     # GQA 3, head_dim not a vector multiple
    dict(dim=72, n_heads=36, n_kv_heads=2, head_dim=8, ffn_dim=50),     # GQA 18: a group in two attention calls
])
@pytest.mark.parametrize("isa", supported_isas())
def test_shapes_and_gqa(dims, isa):
    cfg = ModelConfig(n_layers=2, vocab_size=97, max_seq_len=128, **dims)
    model = random_model(cfg, qk_gain=2.0)
    path = CpuDecodePath(model, isa=isa)
    for ref, fast, _, _ in run_both(model, path, [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11]], steps=6):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_long_context_and_threads():
    """1000 cached tokens (the attention loop, not the weights, dominates), 1 and 2 threads."""
    model = random_model(SMALL, SpanBias(alibi_slopes=alibi_slopes(6)), qk_gain=2.0)
    prompt = torch.randint(0, SMALL.vocab_size, (1000,), generator=torch.Generator().manual_seed(3)).tolist()
    for threads in (1, 2):
        path = CpuDecodePath(model, num_threads=threads)
        assert path.num_threads == threads
        for ref, fast, _, _ in run_both(model, path, [prompt], steps=2, capacity=1010):
            torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_bucket_table_is_the_reference_bucketing():
    for num_buckets, max_distance in ((32, 128), (8, 12), (2, 5), (64, 1000)):
        table_span = SpanBias(bucket_bias=torch.arange(num_buckets, dtype=torch.float32)[None].repeat(2, 1),
                              num_buckets=num_buckets, max_distance=max_distance)
        table = bucket_table(table_span)
        assert table.shape == (2, max_distance + 1)
        d = torch.arange(5 * max_distance + 50)
        expected = span_bucket(d, num_buckets, max_distance).float()
        assert torch.equal(table[0][d.clamp(max=max_distance)], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", supported_isas())
def test_matvec_kernels_on_odd_sizes(isa, dtype):
    """The step's matrix kernels (up to kStreamVecs vectors: one row after another; more: register blocks of
    rows x vectors over L2 tiles of rows; K in blocks of two vector widths and a tail) on sizes around every
    one of those edges, against fp64 math on the same values."""
    gen = torch.Generator().manual_seed(7)
    for K in (1, 7, 8, 15, 16, 31, 33, 63, 64, 65, 100, 127, 129, 130, 257, 577):
        for batch in (1, 2, 3, 4, 5, 9, 11, 12, 13, 17, 33, 70):
            N = 37 + K % 5 + (150 if batch == 70 else 0)  # (several GEMM tiles, the last ragged)
            weight = torch.randn(N, K, generator=gen).to(dtype)
            x = torch.randn(batch, K, generator=gen)
            out = _ext.ext().cpu_matvec(weight, x, num_threads=2, isa=isa)
            expected = (x.double() @ weight.double().T).float()
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5 * K ** 0.5, msg=f"K={K} batch={batch}")


@pytest.mark.parametrize("isa", supported_isas())
def test_bf16_weights_and_cache(isa):
    """bf16 matrices widened in registers: equal (up to the bf16 KV cache) to fp32 math on the same values."""
    span = span_variants(SMALL.n_heads)["all"]
    model16 = random_model(SMALL, span, dtype=torch.bfloat16, qk_gain=2.0)
    as_fp32 = build_model(SMALL, {k: v.float() for k, v in model16.state_dict().items()}, span=span)
    path = CpuDecodePath(model16, isa=isa)
    prompts = [[3, 17, 250, 9, 44, 101, 7], [5, 6]]
    for cache_dtype in (torch.float32, torch.bfloat16):
        tol = 1e-4 if cache_dtype == torch.float32 else 3e-2
        for ref, fast, _, fast_cache in run_both(as_fp32, path, prompts, steps=10, cache_dtype=cache_dtype):
            assert fast_cache.k[0].dtype == cache_dtype
            torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)


def test_bad_input_raises():
    model = random_model(SMALL)
    path = CpuDecodePath(model)
    cache = new_cache(SMALL, 1, 4)
    tok = torch.tensor([1])
    with pytest.raises(RuntimeError, match="int64"):
        path.step(tok.int(), cache)
    with pytest.raises(RuntimeError, match="shape"):
        path.step(torch.tensor([[1]]), cache)
    with pytest.raises(RuntimeError, match="outside"):
        path.step(torch.tensor([SMALL.vocab_size]), cache)
    with pytest.raises(RuntimeError, match="outside"):
        path.step(torch.tensor([-1]), cache)
    with pytest.raises(RuntimeError, match="shape"):  # batch of the tokens differs from the cache's
        path.step(torch.tensor([1, 2]), cache)
    with pytest.raises(RuntimeError, match="contiguous"):
        path.step(torch.tensor([1, 2, 3, 4])[::2], new_cache(SMALL, 2, 4))
    bad = new_cache(SMALL, 1, 4)
    bad.k[1] = bad.k[1].to(torch.float16)
    with pytest.raises(RuntimeError, match="Half|expected"):
        path.step(tok, bad)
    bad = new_cache(SMALL, 1, 4)
    bad.v[0] = bad.v[0][..., :8].contiguous()
    with pytest.raises(RuntimeError, match="shape"):
        path.step(tok, bad)
    bad = new_cache(SMALL, 1, 4)
    bad.k = bad.k[:1]
    with pytest.raises(RuntimeError, match="per layer"):
        path.step(tok, bad)
    bad = new_cache(SMALL, 1, 4)
    bad.seqlens = torch.tensor([-1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="negative"):
        path.step(tok, bad)
    for _ in range(4):  # fills the cache, then refuses
        path.step(tok, cache)
    assert cache.seqlens.tolist() == [4]
    with pytest.raises(CacheFullError):
        path.step(tok, cache)
    assert cache.seqlens.tolist() == [4]  # a refused step changes nothing
    with pytest.raises(RuntimeError, match="isa"):
        CpuDecodePath(model, isa="sse9")


def test_bad_weights_raise():
    model = random_model(SMALL)
    model.layers[1].attention.wq.weight.data = torch.zeros(5, SMALL.dim)
    with pytest.raises(RuntimeError, match="wq"):
        CpuDecodePath(model)
    model = random_model(SMALL, dtype=torch.float16)
    with pytest.raises(ValueError, match="float16"):
        CpuDecodePath(model)
    assert CpuDecodePath.for_model(model) is None
    decoder = CpuDecodePath(random_model(SMALL))._decoder
    table = torch.zeros(8, SMALL.head_dim)
    with pytest.raises(RuntimeError, match="rope_table must be a contiguous float32"):
        decoder.set_rope_table(table.double())
    with pytest.raises(RuntimeError, match="rope_table must be contiguous"):
        decoder.set_rope_table(torch.zeros(SMALL.head_dim, 8).t())
    with pytest.raises(RuntimeError, match="even rot_dim"):
        decoder.set_rope_table(torch.zeros(8, 3))


# ----------------------------------------------------------------------------------------------------
# Regression guard: the decode step is a handful of operations, not hundreds.

FAST_STEP_DISPATCH_BUDGET = 1  # torch ops dispatched by one C++ decode step (today: 1, the logits' empty)
FAST_STEP_PYTHON_CALL_BUDGET = 8  # Python-level calls (Python and C functions) of a steady step (today: 6)
TUNING_STEP_PYTHON_CALL_BUDGET = 30  # ... of a step that times the thread count (today: 12, 21 when deciding)


class _DispatchCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def count_dispatched(fn):
    with _DispatchCounter() as counter:
        fn()
    return counter.ops


def count_python_calls(fn):
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_decode_step_op_count_budget():
    """The regression guard (no timing): one decode step dispatches at most FAST_STEP_DISPATCH_BUDGET torch
    ops and makes a handful of Python calls, whatever the model size; the eager step makes hundreds."""
    cfg = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=101, ffn_dim=96, max_seq_len=64)
    model = random_model(cfg)
    path = CpuDecodePath(model)
    (ref_cache, fast_cache), _ = prefill_both(model, [[1, 2, 3]], 48)
    tok = torch.tensor([7])
    steady = []
    for step in range(20):  # covers the thread tuner's probe steps and the steady state after them
        probing = path._tuner is not None and path._tuner.next_threads() is not None
        if step % 2:
            assert len(count_dispatched(lambda: path.step(tok, fast_cache))) <= FAST_STEP_DISPATCH_BUDGET
            continue
        calls = count_python_calls(lambda: path.step(tok, fast_cache))
        assert calls <= (TUNING_STEP_PYTHON_CALL_BUDGET if probing else FAST_STEP_PYTHON_CALL_BUDGET), (step, calls)
        if not probing:
            steady.append(calls)
    assert steady  # the steady state was measured
    eager_ops = count_dispatched(lambda: model(tok[:, None], ref_cache))
    assert len(eager_ops) > 100  # the counter does see the eager model's ops (442 for these 4 layers)
    assert count_python_calls(lambda: model(tok[:, None], ref_cache)) > 300


# ----------------------------------------------------------------------------------------------------
# The embedded SmolLM2-135M

# Fixed token-id prompts (ids in SmolLM2's vocabulary; no tokenizer needed).
SMOL_PROMPTS = [
    [28, 2568],
    [504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 30, 2978],
    [4093, 28, 5248, 253, 27, 9361],
]


@pytest.fixture(scope="module")
def smol():
    from llama_fast.loaders import load_checkpoint

    try:
        ckpt = load_checkpoint("smollm2-135m-instruct", progress=False)
    except Exception as err:  # noqa: BLE001 - the model package is optional
        pytest.skip(f"embedded model unavailable: {err}")
    return ckpt


@pytest.fixture(scope="module")
def smol_fp32(smol):
    return build_model(smol.config, smol.weights, dtype=torch.float32)


def greedy_fast(model, path, prompt, steps):
    cfg = model.config
    cache = new_cache(cfg, 1, len(prompt) + steps + 1, model.tok_embeddings.weight.dtype)
    logits = model(torch.tensor([prompt]), cache)[:, -1]
    tokens, all_logits = [], []
    for _ in range(steps):
        tok = logits.argmax(-1)
        tokens.append(int(tok))
        logits = path.step(tok, cache)
        all_logits.append(logits[0])
    return tokens, torch.stack(all_logits)


def test_smollm_fp32_logits_and_greedy_tokens(smol_fp32):
    """32 greedy tokens per prompt from the C++ step; the reference model, run over the same prompt and
    tokens in one pass, gives the same logits (1e-4) and hence the same greedy choice at every step."""
    path = CpuDecodePath(smol_fp32)
    for prompt in SMOL_PROMPTS:
        tokens, fast_logits = greedy_fast(smol_fp32, path, prompt, 32)
        seq = torch.tensor([prompt + tokens])
        ref_logits = smol_fp32(seq, new_cache(smol_fp32.config, 1, seq.shape[1]))[0]  # (T, vocab)
        ref_logits = ref_logits[len(prompt):len(prompt) + 31]  # after each generated token but the last
        torch.testing.assert_close(fast_logits[:31], ref_logits, rtol=1e-4, atol=2e-4)
        assert ref_logits.argmax(-1).tolist() == tokens[1:]


def test_smollm_fp32_step_equals_reference_step(smol_fp32):
    path = CpuDecodePath(smol_fp32)
    for ref, fast, _, _ in run_both(smol_fp32, path, [SMOL_PROMPTS[1], SMOL_PROMPTS[0]], steps=4):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=2e-4)
        assert torch.equal(fast.argmax(-1), ref.argmax(-1))


def test_smollm_bf16_within_bf16_tolerance_of_fp32(smol, smol_fp32):
    model16 = build_model(smol.config, smol.weights, dtype=torch.bfloat16)
    path = CpuDecodePath(model16)
    prompt = SMOL_PROMPTS[1]
    tokens, fast_logits = greedy_fast(model16, path, prompt, 16)
    seq = torch.tensor([prompt + tokens])
    ref = smol_fp32(seq, new_cache(smol_fp32.config, 1, seq.shape[1]))[0, len(prompt):len(prompt) + 15]
    err = (fast_logits[:15] - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 0.03 * scale, (err, scale)  # bf16 weights: ~2^-8 relative per weight
    agree = (fast_logits[:15].argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.9


def test_thread_tuner_picks_the_faster_count():
    from llama_fast.threads import ThreadTuner

    tuner = ThreadTuner([2, 1], probes=2, every=10)
    seen = []
    for step in range(25):
        threads = tuner.next_threads()
        seen.append(threads)
        if threads is not None:
            slow = (step < 10) == (threads == 1)  # 2 threads are faster first, 1 thread later
            tuner.record(threads, 0.05 if slow else 0.02)
            if step % 10 == 3:
                assert tuner.best == (2 if step < 10 else 1)
        tuner.steps += 1
    assert seen[:5] == [2, 1, 2, 1, None] and seen[10:14] == [2, 1, 2, 1]


def test_default_path_tunes_threads_and_stays_correct():
    model = random_model(SMALL, qk_gain=2.0)
    path = CpuDecodePath(model)
    for ref, fast, _, _ in run_both(model, path, [[1, 2, 3]], steps=10):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    if torch.get_num_threads() > 1:
        assert path._tuner is not None and path._tuner.best in (1, torch.get_num_threads())


# ----------------------------------------------------------------------------------------------------
# The engine: LLM.generate decodes through the C++ step on CPU, token for token like the eager path


def test_engine_cpp_decode_equals_eager(smollm):
    from llama_fast import LLM

    prompts = ["I love", "The quick brown fox jumps over the lazy dog. Then",
               "def fibonacci(n):\n    if n < 2:\n        return n\n"]
    eager = LLM(smollm.model, smollm.tokenizer, decode="eager")
    fast = LLM(smollm.model, smollm.tokenizer, decode="cpp")
    batch_fast = fast.generate(prompts, max_new_tokens=24)  # a batch of rows of different lengths
    assert fast._fast_path is not None
    for prompt, together in zip(prompts, batch_fast):
        alone = eager.generate(prompt, max_new_tokens=24)
        assert together.token_ids == alone.token_ids
    assert eager._fast_path is None


def test_engine_decode_choice(smollm, monkeypatch):
    from llama_fast import LLM

    with pytest.raises(ValueError, match="decode"):
        LLM(smollm.model, smollm.tokenizer, decode="fastest")
    monkeypatch.setenv("LLAMA_FAST_BACKEND", "reference")
    assert LLM(smollm.model, smollm.tokenizer).decode == "eager"
    monkeypatch.setenv("LLAMA_FAST_DECODE", "cpp")
    assert LLM(smollm.model, smollm.tokenizer).decode == "cpp"
    half = random_model(SMALL, dtype=torch.float16)
    llm = LLM(half, smollm.tokenizer, decode="cpp")
    with pytest.raises(RuntimeError, match="float16"):
        llm.decode_path(new_cache(SMALL, 1, 8, torch.float16))


@pytest.mark.parametrize("isa", supported_isas()[-1:])
def test_streaming_cache_across_evictions(isa):
    """A StreamingKVCache (window + sinks, keys moved and re-rotated on eviction) decodes through the C++
    step exactly as through the model."""
    from llama_fast.streaming import StreamingKVCache

    span = SpanBias(window=6, sink_tokens=2)
    model = random_model(SMALL, span, qk_gain=2.0)
    path = CpuDecodePath(model, isa=isa)
    slack = 3
    caches = []
    for _ in range(2):
        base = StaticKVCache(SMALL.n_layers, 2, 2 + 6 + slack, SMALL.n_kv_heads, SMALL.head_dim)
        caches.append(StreamingKVCache(base, span, lambda n: model.rope_table(n, "cpu"), slack))
    assert path.applies_to(caches[1])
    prompt = torch.tensor([[3, 17, 250], [9, 44, 101]])
    logits = model(prompt, caches[0])[:, -1]
    model(prompt, caches[1])
    for _ in range(30):
        tokens = logits.argmax(-1)
        ref = model(tokens[:, None], caches[0])[:, -1]
        fast = path.step(tokens, caches[1])
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(caches[0].seqlens, caches[1].seqlens)
        logits = ref
    assert int(caches[1].evicted.sum()) > 20
