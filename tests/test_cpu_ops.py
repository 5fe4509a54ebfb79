"""The "cpu" backend of the model's ops (llama_fast.ops) against the pure-PyTorch reference: attention over
a KV cache in C++ (every SpanBias variant, GQA, prompts and single tokens, rows of different lengths) and
linear (the C++ matrix-vector kernels for a few rows, bf16 weights in fp32 for many). Fresh random
inputs, odd sizes; bad input raises a clear error.
"""
import pytest
import torch

from llama_fast import _ext, ops, reference
from llama_fast.span import SpanBias, alibi_slopes

pytestmark = pytest.mark.skipif(not _ext.has_ext(), reason="llama_fast._C is not built")


def spans(n_heads, gen):
    buckets = torch.randn(n_heads, 8, generator=gen)
    return {
        "plain": SpanBias(),
        "alibi": SpanBias(alibi_slopes=alibi_slopes(n_heads)),
        "buckets": SpanBias(bucket_bias=buckets, num_buckets=8, max_distance=12),
        "window_sinks": SpanBias(window=6, sink_tokens=2),
        "window": SpanBias(window=3),
        "softcap": SpanBias(logit_softcap=1.5),
        "all": SpanBias(alibi_slopes=alibi_slopes(n_heads), bucket_bias=buckets, num_buckets=8, max_distance=12,
                        window=9, sink_tokens=3, logit_softcap=3.0),
    }


@pytest.mark.parametrize("variant", ["plain", "alibi", "buckets", "window_sinks", "window", "softcap", "all"])
@pytest.mark.parametrize("heads,head_dim", [((6, 2), 16), ((4, 4), 64), ((5, 1), 18), ((34, 2), 8)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_reference(variant, heads, head_dim, cache_dtype):
    H, Hkv = heads
    gen = torch.Generator().manual_seed(100 * len(variant) + 10 * H + head_dim)
    span = spans(H, gen)[variant]
    B, S = 3, 61
    for T in (1, 5, 37):
        k = (2 * torch.randn(B, S, Hkv, head_dim, generator=gen)).to(cache_dtype)
        v = torch.randn(B, S, Hkv, head_dim, generator=gen).to(cache_dtype)
        q = 2 * torch.randn(B, T, H, head_dim, generator=gen)
        q_sink = 2 * torch.randn(B, T, H, head_dim, generator=gen)  # meets the sinks past the window
        seqlens = torch.tensor([T, T + 11, S], dtype=torch.int32)  # a fresh prompt, a continued one, a full cache
        for qs in (None, q_sink):
            got = ops.decode_attention(q, k, v, seqlens, span, q_sink=qs, backend="cpu")
            want = reference.decode_attention(q, k, v, seqlens, span, q_sink=qs)
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=f"T={T}")


@pytest.mark.parametrize("variant", ["plain", "window_sinks", "all"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_paged_decode_attention_matches_reference(variant, cache_dtype):
    """The C++ attention over a paged pool (blocks in scrambled order, rows of different lengths, unused
    table entries holding anything) equals the reference's, q_sink included."""
    gen = torch.Generator().manual_seed(7 + len(variant))
    H, Hkv, D, bs = 6, 2, 32, 4
    span = spans(H, gen)[variant]
    pool_k = (2 * torch.randn(40, bs, Hkv, D, generator=gen)).to(cache_dtype)
    pool_v = torch.randn(40, bs, Hkv, D, generator=gen).to(cache_dtype)
    table = torch.randperm(40, generator=gen)[:30].reshape(3, 10).to(torch.int32)
    table[0, 2:] = -1  # past row 0's 5 tokens: never read
    for T in (1, 3):
        seqlens = torch.tensor([5, 23, 40], dtype=torch.int32)
        q, q_sink = (2 * torch.randn(3, T, H, D, generator=gen) for _ in range(2))
        got = ops.decode_attention(q, pool_k, pool_v, seqlens, span, table, q_sink=q_sink, backend="cpu")
        want = reference.decode_attention(q, pool_k, pool_v, seqlens, span, table, q_sink=q_sink)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    with pytest.raises(RuntimeError, match="outside the pool"):
        ops.decode_attention(q, pool_k, pool_v, torch.tensor([9, 23, 40], dtype=torch.int32), span, table,
                             backend="cpu")


def test_bucket_table_is_built_once_and_follows_in_place_changes():
    """The C++ attention's bucket table is derived once per span, not per layer and step; a bucket_bias
    changed in place (training, a loader filling it) gets a fresh table and the attention follows it."""
    gen = torch.Generator().manual_seed(9)
    span = SpanBias(bucket_bias=torch.randn(4, 8, generator=gen), num_buckets=8, max_distance=12)
    table = ops.cpu_bucket_table(span)
    assert ops.cpu_bucket_table(span) is table
    torch.testing.assert_close(table, reference.bucket_table(span))
    q = torch.randn(1, 1, 4, 16, generator=gen)
    k, v = (torch.randn(1, 30, 2, 16, generator=gen) for _ in range(2))
    seqlens = torch.tensor([30], dtype=torch.int32)
    before = ops.decode_attention(q, k, v, seqlens, span, backend="cpu")
    with torch.no_grad():
        span.bucket_bias.mul_(-3.0)
    fresh = ops.cpu_bucket_table(span)
    assert fresh is not table
    torch.testing.assert_close(fresh, reference.bucket_table(span))
    after = ops.decode_attention(q, k, v, seqlens, span, backend="cpu")
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference.decode_attention(q, k, v, seqlens, span), rtol=2e-5, atol=2e-5)
    assert ops.cpu_bucket_table(SpanBias()) is None


def test_decode_attention_bf16_queries_and_scale():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 7, 4, 32, generator=gen).bfloat16()
    k, v = (torch.randn(2, 20, 2, 32, generator=gen).bfloat16() for _ in range(2))
    seqlens = torch.tensor([7, 20], dtype=torch.int32)
    got = ops.decode_attention(q, k, v, seqlens, SpanBias(), scale=0.3, backend="cpu")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, reference.decode_attention(q, k, v, seqlens, SpanBias(), scale=0.3))


def test_decode_attention_dispatch():
    """On CPU the C++ version runs by default; an fp16 cache goes to the reference, and forcing the C++
    version on one says why it cannot."""
    q = torch.randn(1, 2, 2, 8)
    k = torch.randn(1, 4, 1, 8)
    seqlens = torch.tensor([3], dtype=torch.int32)
    assert ops.choose_backend("decode_attention", q.device, None, cpu_ext=True) == "cpu"
    torch.testing.assert_close(ops.decode_attention(q, k, k, seqlens), reference.decode_attention(q, k, k, seqlens))
    with pytest.raises(ops.BackendError, match="float16 cache"):
        ops.decode_attention(q.half(), k.half(), k.half(), seqlens, backend="cpu")


def test_cpu_attention_rejects_bad_input():
    c = _ext.ext()
    q = torch.randn(1, 2, 4, 8)
    k = torch.randn(1, 5, 2, 8)
    ok = torch.tensor([3], dtype=torch.int32)
    cases = [
        (dict(q=q.double()), "q must be float32"),
        (dict(q=q[:, :, :3].contiguous()), "multiple of the KV heads"),
        (dict(k_cache=k.half(), v_cache=k.half()), "k_cache must be float32 or bfloat16"),
        (dict(v_cache=k[:, :4].contiguous()), "v_cache must match"),
        (dict(k_cache=torch.randn(1, 5, 2, 6), v_cache=torch.randn(1, 5, 2, 6)), "k_cache must be"),
        (dict(seqlens=torch.tensor([1], dtype=torch.int32)), "must count the 2 new queries"),
        (dict(seqlens=torch.tensor([6], dtype=torch.int32)), "fit the cache"),
        (dict(seqlens=torch.tensor([3, 3], dtype=torch.int32)), "seqlens must be int32 of shape"),
        (dict(seqlens=ok.long()), "seqlens must be int32"),
        (dict(q=q.transpose(1, 2)), "contiguous"),
        (dict(alibi_slopes=torch.ones(3)), "alibi_slopes must have shape"),
        (dict(bucket_table=torch.ones(4)), "bucket_table must be"),
        (dict(window=2, sink_tokens=2), "sink_tokens needs a window"),
        (dict(scale=0.0), "scale must be positive"),
        (dict(q_sink=q[:, :1].contiguous()), "q_sink must be float32 shaped like q"),
        (dict(q_sink=q.double()), "q_sink must be float32"),
        (dict(q=q[:, :, :0].contiguous()), "multiple of the KV heads"),  # (no heads: once a division by zero)
        (dict(num_threads=1025), r"num_threads must be in \[0, 1024\]"),
        (dict(num_threads=2**32), r"num_threads must be in \[0, 1024\]"),  # (not wrapped to 0)
        (dict(num_threads=-1), r"num_threads must be in \[0, 1024\]"),
    ]
    for bad, message in cases:
        args = dict(q=q, k_cache=k, v_cache=k, seqlens=ok) | bad
        with pytest.raises(RuntimeError, match=message):
            c.cpu_attention(**args)
    for threads in (-1, 1025, 2**31):
        with pytest.raises(RuntimeError, match=r"cpu_matvec: num_threads must be in \[0, 1024\]"):
            c.cpu_matvec(torch.randn(64, 32), torch.randn(1, 32), num_threads=threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_reference(dtype):
    gen = torch.Generator().manual_seed(11)
    for K, N in ((7, 5), (64, 33), (577, 130)):
        weight = torch.randn(N, K, generator=gen).to(dtype)
        # rows 0..13 (the C++ matrix-vector kernels, then its GEMM), 63 and 65 (both sides of the threshold)
        for shape in ((1, 1), (2, 3), (1, 8), (3, 3), (1, 12), (1, 13), (3, 21), (5, 13), (0, 4)):
            x = torch.randn(*shape, K, generator=gen).to(dtype)
            got = ops.linear(x, weight, backend="cpu")
            assert got.shape == (*shape, N) and got.dtype == dtype
            want = (x.double() @ weight.double().T).to(dtype)
            tol = dict(rtol=1e-5, atol=1e-5 * K ** 0.5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
            torch.testing.assert_close(got, want, **tol, msg=f"K={K} shape={shape}")


def test_linear_dispatch():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    assert torch.equal(ops.linear(x, w, backend="reference"), torch.nn.functional.linear(x, w))
    torch.testing.assert_close(ops.linear(x, w), torch.nn.functional.linear(x, w))
    with pytest.raises(ops.BackendError, match="not a contiguous fp32/bf16 weight"):
        ops.linear(x, w.t().contiguous().t(), backend="cpu")
    torch.testing.assert_close(ops.linear(x.half(), w.half()), torch.nn.functional.linear(x.half(), w.half()))


def test_rms_norm_rope_swiglu_match_reference():
    gen = torch.Generator().manual_seed(13)
    for dim in (1, 7, 64, 577):
        x, residual = torch.randn(2, 5, dim, generator=gen), torch.randn(2, 5, dim, generator=gen)
        weight = 1 + 0.1 * torch.randn(dim, generator=gen)
        torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5, backend="cpu"), reference.rms_norm(x, weight, 1e-5))
        for got, want in zip(ops.rms_norm(x, weight, 1e-6, residual, backend="cpu"),
                             reference.rms_norm(x, weight, 1e-6, residual)):
            torch.testing.assert_close(got, want)
        gate, up = 4 * torch.randn(3, dim, generator=gen), torch.randn(3, dim, generator=gen)
        torch.testing.assert_close(ops.swiglu(gate, up, backend="cpu"), reference.swiglu(gate, up))
    table = reference.rope_cos_sin_cache(50, 16, 10000.0)
    for rot_dim, head_dim in ((16, 16), (16, 18), (8, 16)):  # all of the head, a head with a tail, partial rotary
        q, k = torch.randn(2, 7, 5, head_dim, generator=gen), torch.randn(2, 7, 1, head_dim, generator=gen)
        positions = torch.randint(0, 50, (2, 7), generator=gen)
        want = reference.apply_rope(q.clone(), k.clone(), positions, table[:, :rot_dim].contiguous())
        got = ops.apply_rope(q, k, positions.int(), table[:, :rot_dim].contiguous(), backend="cpu")
        assert got[0] is q and got[1] is k  # in place
        torch.testing.assert_close(got, want)


def test_swiglu_at_the_edges_of_exp():
    """The C++ SwiGLU computes exp with its own vector formula: check it where exp over- and underflows, at
    +-0, and that NaN stays NaN, in the vector body and the scalar tail alike."""
    edges = [-1e4, -200.0, -88.5, -87.0, -20.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 20.0, 87.0, 88.5, 200.0, 1e4]
    gate = torch.tensor(edges * 3 + [float("nan")] * 2)  # 47 values: the tail of 8- and 16-wide vectors too
    up = torch.linspace(-2, 2, gate.numel())
    got, want = ops.swiglu(gate, up, backend="cpu"), reference.swiglu(gate, up)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-30, equal_nan=True)


def test_elementwise_cpu_ops_reject_bad_input():
    c = _ext.ext()
    x, w = torch.randn(3, 8), torch.ones(8)
    with pytest.raises(RuntimeError, match="weight must be"):
        c.cpu_rms_norm(x, torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="residual must have"):
        c.cpu_rms_norm(x, w, 1e-5, torch.randn(3, 7))
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        c.cpu_rms_norm(x.double(), w, 1e-5)
    with pytest.raises(RuntimeError, match="gate and up"):
        c.cpu_swiglu(x, torch.randn(8, 3))
    q, k, table = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 1, 8), torch.randn(10, 8)
    with pytest.raises(RuntimeError, match="outside the RoPE table"):
        c.cpu_rope(q, k, torch.tensor([[0, 10]]), table)
    with pytest.raises(RuntimeError, match="outside the RoPE table"):
        c.cpu_rope(q, k, torch.tensor([[-1, 0]]), table)
    with pytest.raises(RuntimeError, match="positions must have the leading dims"):
        c.cpu_rope(q, k, torch.tensor([0, 1]), table)
    with pytest.raises(RuntimeError, match="even rot_dim"):
        c.cpu_rope(q, k, torch.tensor([[0, 1]]), torch.randn(10, 10))
    with pytest.raises(RuntimeError, match="positions must be int32 or int64"):
        c.cpu_rope(q, k, torch.tensor([[0.0, 1.0]]), table)
    with pytest.raises(ops.BackendError, match="contiguous float32"):
        ops.swiglu(x.bfloat16(), x.bfloat16(), backend="cpu")
    torch.testing.assert_close(ops.swiglu(x.bfloat16(), x.bfloat16()), reference.swiglu(x.bfloat16(), x.bfloat16()))
