"""Streaming past the window with attention sinks, and perplexity through the streaming cache."""

import pytest
import torch

from llama_fast import LLM, SamplingParams, SpanBias
from llama_fast.streaming import StreamingKVCache, rotate_keys_back
from llama_fast.reference import apply_rope, rope_cos_sin_cache
from llama_fast.sampling import row_params
from llama_fast.paths import SAMPLE_TEXT


@pytest.fixture(scope="module")
def shakespeare():
    with open(SAMPLE_TEXT, encoding="utf-8") as f:
        return f.read()


def test_rotate_keys_back_equals_rotation_at_the_new_position():
    table = rope_cos_sin_cache(300, 64, 10000.0)
    k = torch.randn(5, 3, 64)
    at_200 = apply_rope(torch.zeros(5, 1, 64), k.clone(), torch.full((5,), 200), table)[1]
    at_150 = apply_rope(torch.zeros(5, 1, 64), k.clone(), torch.full((5,), 150), table)[1]
    assert torch.allclose(rotate_keys_back(at_200, 50, table), at_150, atol=1e-4)  # two fp32 rotations vs one


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


@pytest.mark.parametrize("route", ["session", "static", "paged"])
def test_eviction_without_sinks_is_exact(smollm, route):
    """With no sinks a window is exact attention over the whole history, however the cache drops what the
    window hides: the stream must equal windowed attention over the whole history, token for token. The
    session frees blocks; the model's forward (decode="eager") evicts and re-rotates the survivors' keys
    (StreamingKVCache by its slack, the paged cache by whole blocks)."""
    llm = LLM(smollm.model, smollm.tokenizer, decode="auto" if route == "session" else "eager")
    llm = llm.with_span(SpanBias(window=40))
    llm.kv_cache = "static" if route == "session" else route
    prompt = llm.tokenizer.encode("The history of the city begins")
    caches = []
    got = [t for (t,) in llm.generate_ids([prompt], [SamplingParams(temperature=0)], 90, on_cache=caches.append)]
    if route == "session":
        assert caches[0].num_blocks * 16 < len(prompt) + 90  # the pool cannot hold the whole history
    else:
        evicted = caches[0].evicted if route == "static" else caches[0].evicted(caches[0].seq_ids[0])
        assert int(evicted if isinstance(evicted, int) else evicted.sum()) > 40
    assert got == windowed_greedy(llm, prompt, 90)


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
    assert not isinstance(wide.new_cache(1, 8192), StreamingKVCache)
    assert torch.allclose(wide.logits(ids), smollm.logits(ids), atol=1e-5)
