"""Streaming past the window with attention sinks, and perplexity through the streaming cache."""

import pytest
import torch

from llama_fast import LLM, SamplingParams, SpanBias
from llama_fast.cache import PagedKVCache
from llama_fast.config import ModelConfig
from llama_fast.reference import sequence_logits
from llama_fast.span import alibi_slopes
from llama_fast.sampling import row_params
from llama_fast.paths import SAMPLE_TEXT

from models import random_model


@pytest.fixture(scope="module")
def shakespeare():
    with open(SAMPLE_TEXT, encoding="utf-8") as f:
        return f.read()


def test_window_and_sinks_perplexity_reproduces_streaming_llm(smollm, shakespeare):
    """Perplexity over 4096 tokens with window 256: sinks keep it near dense; no sinks is clearly worse."""
    dense = smollm.perplexity(shakespeare, max_tokens=4096)
    sinks = smollm.perplexity(shakespeare, max_tokens=4096, span=SpanBias(window=256, sink_tokens=4))
    no_sinks = smollm.perplexity(shakespeare, max_tokens=4096, span=SpanBias(window=256))
    print(f"\nperplexity over 4096 tokens: dense {dense.perplexity:.3f}, window 256 + 4 sinks "
          f"{sinks.perplexity:.3f}, window 256 alone {no_sinks.perplexity:.3f}")
    assert dense.num_tokens == sinks.num_tokens == 4095
    assert sinks.perplexity <= 1.15 * dense.perplexity
    assert no_sinks.perplexity >= 1.5 * sinks.perplexity
    assert sinks.kv_bytes < dense.kv_bytes / 8  # constant memory: the sinks' block, the window and one chunk


def test_long_generation_keeps_memory_constant_and_text_alive(smollm):
    llm = smollm.with_span(SpanBias(window=64, sink_tokens=4))
    prompt_ids = [llm.tokenizer.encode("Once upon a time, in a land far away,")]
    params = row_params(1, 7, temperature=0.8, top_p=0.95, repetition_penalty=1.1)
    runners, held, tokens = [], [], []
    # stop_at_eos=False: the length must not hang on whether this seed happens to draw EOS.
    for (token,) in llm.generate_ids(prompt_ids, params, max_new_tokens=800, on_cache=runners.append,
                                     stop_at_eos=False):
        tokens.append(token)
        held.append(runners[0].num_blocks - runners[0].num_free_blocks)
    assert len(tokens) == 800
    assert max(held) <= runners[0].num_blocks <= 8  # 8 blocks of 16 tokens for 800 + the prompt
    assert max(held[150:]) == max(held)  # bounded, and bounded early
    last = tokens[-500:]
    assert len(set(last)) / len(last) > 0.2  # no collapse into a repeated token


@pytest.mark.parametrize("decode", ["auto", "eager"])
def test_streaming_equals_dense_inside_the_window(smollm, decode):
    """While the whole text fits in the window, windowed attention is dense attention, token for token, on
    the fast path (the C++ step) and on the reference path (the model's forward)."""
    llm = LLM(smollm.model, smollm.tokenizer, decode=decode)
    streaming = llm.with_span(SpanBias(window=64, sink_tokens=4))
    assert streaming.generate("I love", max_new_tokens=40).token_ids == llm.generate("I love", max_new_tokens=40).token_ids


def test_streaming_continues_past_eviction(smollm):
    """A stream that overflows its window keeps the dense tokens while inside it, then goes on."""
    streaming = smollm.with_span(SpanBias(window=48, sink_tokens=4))
    streamed = streaming.generate("I love", max_new_tokens=100)
    assert streamed.token_ids[:40] == smollm.generate("I love", max_new_tokens=40).token_ids
    assert len(streamed.token_ids) == 100


def windowed_greedy(llm, prompt_ids, n):
    """Greedy tokens from full forward passes over the whole history under llm's window (nothing evicted)."""
    history, out = list(prompt_ids), []
    for _ in range(n):
        out.append(int(llm.logits(torch.tensor([history]))[0, -1].argmax()))
        history.append(out[-1])
    return out


@pytest.mark.parametrize("decode", ["cpp", "eager"])
def test_eviction_without_sinks_is_exact(smollm, decode):
    """With no sinks a window is exact attention over the whole history, however the cache drops what the
    window hides: the stream must equal windowed attention over the whole history, token for token. The
    session frees blocks; the model's forward (decode="eager", a ModelRunner) drops whole blocks and
    re-indexes the survivors."""
    llm = LLM(smollm.model, smollm.tokenizer, decode=decode).with_span(SpanBias(window=40))
    prompt = llm.tokenizer.encode("The history of the city begins")
    got, runner, evicted = greedy_stream(llm, prompt, 90)
    assert runner.num_blocks * 16 < len(prompt) + 90  # the pool cannot hold the whole history
    assert decode == "cpp" or evicted > 40
    assert got == windowed_greedy(llm, prompt, 90)


def greedy_stream(llm, prompt_ids, n):
    """(greedy tokens, the runner, the most tokens its paged cache evicted: 0 on the session)."""
    runners, tokens, evicted = [], [], 0
    for (token,) in llm.generate_ids([prompt_ids], [SamplingParams(temperature=0)], n, on_cache=runners.append):
        tokens.append(token)
        cache = getattr(runners[0], "cache", None)
        if cache is not None and cache.seq_ids:
            evicted = max(evicted, cache.evicted(cache.seq_ids[0]))
    return tokens, runners[0], evicted


@pytest.mark.parametrize("window, sinks", [(32, 4), (40, 3)])
def test_every_route_streams_alike_past_the_window(smollm, window, sinks):
    """Window + sinks, greedy, far past the window: the C++ session and the model's forward (a ModelRunner,
    whose paged cache drops whole blocks and re-indexes), each prompt alone and both in one batch, give the
    same tokens: one rule (sinks scored from sink_position) whichever runner and whenever a row evicts."""
    span = SpanBias(window=window, sink_tokens=sinks)
    session = smollm.with_span(span)
    eager = LLM(smollm.model, smollm.tokenizer, decode="eager").with_span(span)
    prompts = ["The history of the city begins", "A long time ago, on a small island far to the north, there lived"]
    want = [session.generate(p, max_new_tokens=100).token_ids for p in prompts]
    for prompt, tokens in zip(prompts, want):
        alone, _, evicted = greedy_stream(eager, eager.tokenizer.encode(prompt), 100)
        assert alone[:len(tokens)] == tokens and evicted > 0
    batch = eager.generate_ids([eager.tokenizer.encode(p) for p in prompts], [SamplingParams(temperature=0)] * 2, 100)
    rows = list(zip(*batch))
    assert [list(row[:len(tokens)]) for row, tokens in zip(rows, want)] == want


def test_sampled_windowed_batches_agree_across_runners_and_pool_sizes(smollm, shakespeare):
    """Prompts longer and shorter than the window, two sampled sequences each (forks), 150 tokens past a
    window of 48 with 4 sinks: the model's forward gives the session's tokens, and so it does with a pool
    that holds two streams at most (the rest wait or are preempted and computed again)."""
    span = SpanBias(window=48, sink_tokens=4)
    session = smollm.with_span(span)
    eager = LLM(smollm.model, smollm.tokenizer, decode="eager").with_span(span)
    ids = smollm.tokenizer.encode(shakespeare[:20000])
    prompts = [ids[:300], ids[1000:1017], ids[2000:2100]]
    kwargs = dict(max_new_tokens=150, num_return_sequences=2, temperature=0.7, seed=3)
    want = [[c.token_ids for c in row] for row in session.generate(prompts, **kwargs)]
    assert [[c.token_ids for c in row] for row in eager.generate(prompts, **kwargs)] == want
    eager.max_kv_tokens = 16 * 12
    assert [[c.token_ids for c in row] for row in eager.generate(prompts, **kwargs)] == want


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_forward_through_an_evicting_cache_equals_the_sequence_reference(backend, monkeypatch):
    """The model's forward streaming far past its window through an evicting paged cache, in prompt chunks
    and single tokens, gives reference.sequence_logits (the session's oracle) for every token: on the CPU's
    own choice of ops, the plain-PyTorch ops and the Triton kernels (interpreted here). ALiBi and a learned
    span table make every distance count, the sinks' included."""
    cfg = ModelConfig(dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_dim=80, max_seq_len=256,
                      head_dim=64)
    gen = torch.Generator().manual_seed(5)
    span = SpanBias(window=20, sink_tokens=3, alibi_slopes=alibi_slopes(4), bucket_bias=torch.randn(4, 16, generator=gen),
                    num_buckets=16, max_distance=40)
    model = random_model(cfg, span, seed=3)
    tokens = torch.randint(0, cfg.vocab_size, (90,), generator=gen).tolist()
    want = sequence_logits(model, tokens)
    if backend == "auto":
        monkeypatch.delenv("LLAMA_FAST_BACKEND", raising=False)
    else:
        monkeypatch.setenv("LLAMA_FAST_BACKEND", backend)
    cache = PagedKVCache.for_span(cfg.n_layers, 16, 4, cfg.n_kv_heads, cfg.head_dim, span)
    cache.set_batch([cache.add_sequence()])
    got, fed = [], 0
    for n in [7, 8, 5] + [1] * 20 + [8, 3] + [1] * 100:
        n = min(n, len(tokens) - fed)
        if n == 0:
            break
        got.append(model(torch.tensor([tokens[fed:fed + n]]), cache)[0])
        fed += n
    assert cache.evicted(cache.seq_ids[0]) > 40
    torch.testing.assert_close(torch.cat(got), want, atol=1e-4, rtol=1e-4)


def test_streams_run_a_batch_in_constant_memory(smollm):
    """Several independent streams at once: the blocks in use stop growing once the windows fill, and each
    row's tokens are what it produces alone."""
    llm = smollm.with_span(SpanBias(window=64, sink_tokens=4))
    prompts = [llm.tokenizer.encode(p) for p in ("Once upon a time,", "The recipe for bread is simple: take")]
    params = [SamplingParams(temperature=0.8, top_p=0.95, repetition_penalty=1.1, penalty_last_n=64, seed=s)
              for s in (1, 2)]
    runners, used, rows = [], [], [[], []]
    for step_tokens in llm.generate_ids(prompts, params, 400, on_cache=runners.append, stop_at_eos=False):
        for row, token in zip(rows, step_tokens):
            row.append(token)
        used.append(runners[0].num_blocks - runners[0].num_free_blocks)
    assert all(len(r) == 400 for r in rows)
    assert max(used[150:]) == max(used) <= 2 * 8  # bounded, and bounded early
    for row in rows:
        assert len(set(row[-200:])) / 200 > 0.2  # still text, not one repeated token
    for prompt, p, row in zip(prompts, params, rows):
        assert [t for (t,) in llm.generate_ids([prompt], [p], 60, stop_at_eos=False)] == row[:60]


def test_paged_streams_equal_dense_inside_the_window(smollm):
    prompts = ["I love", "The capital of France is"]
    streaming = smollm.with_span(SpanBias(window=64, sink_tokens=4))
    assert [c.token_ids for c in streaming.generate(prompts, max_new_tokens=30)] == \
        [c.token_ids for c in smollm.generate(prompts, max_new_tokens=30)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(window=0), "window"),
    (dict(window=8, sink_tokens=8), "sink_tokens"),
    (dict(sink_tokens=4), "needs a window"),
])
def test_bad_span_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpanBias(**kwargs)


def test_window_larger_than_context_is_dense(smollm):
    wide = smollm.with_span(SpanBias(window=100_000, sink_tokens=4))
    ids = torch.tensor([smollm.tokenizer.encode("A window wider than the context changes nothing.")])
    assert torch.allclose(wide.logits(ids), smollm.logits(ids), atol=1e-5)
