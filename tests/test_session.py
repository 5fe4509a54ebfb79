"""The C++ decode session (csrc/core/session.h, llama_fast.session) against the plain-PyTorch reference
(reference.sequence_logits), and its promises: a sequence's logits are bitwise the same alone, in any
batch and however its prompt is chunked; forks share blocks; a window frees blocks without changing a
number; bad input raises before any work, and nothing leaks a block."""
import random

import pytest
import torch

from llama_fast import _ext
from llama_fast.config import ModelConfig
from llama_fast.errors import CacheFullError
from llama_fast.reference import sequence_logits
from llama_fast.span import SpanBias, alibi_slopes

pytestmark = pytest.mark.skipif(not _ext.has_ext(), reason="the C++ extensions are not built")

from llama_fast.model_runner import ModelRunner  # noqa: E402
from llama_fast.session import SessionRunner  # noqa: E402

from models import random_model, supported_isas  # noqa: E402


def tiny_config(n_heads=6, n_kv_heads=2, head_dim=64, dim=96, layers=2, vocab=97, ffn=80, max_seq_len=512):
    return ModelConfig(dim=dim, n_layers=layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab,
                       ffn_dim=ffn, max_seq_len=max_seq_len, head_dim=head_dim)


def spans(cfg):
    H = cfg.n_heads
    gen = torch.Generator().manual_seed(3)
    return {
        "causal": SpanBias(),
        "window": SpanBias(window=24),
        "window_sinks": SpanBias(window=24, sink_tokens=4),
        "alibi": SpanBias(alibi_slopes=alibi_slopes(H)),
        "buckets_softcap": SpanBias(bucket_bias=torch.randn(H, 32, generator=gen), num_buckets=32, max_distance=64,
                                    logit_softcap=5.0),
        "everything": SpanBias(alibi_slopes=alibi_slopes(H), bucket_bias=torch.randn(H, 16, generator=gen),
                               num_buckets=16, max_distance=40, window=20, sink_tokens=3, logit_softcap=8.0),
    }


def prompt(n, vocab, seed):
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


@pytest.mark.parametrize("span_name", ["causal", "window", "window_sinks", "alibi", "buckets_softcap", "everything"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2)])
def test_session_matches_reference(span_name, heads):
    cfg = tiny_config(n_heads=heads[0], n_kv_heads=heads[1])
    model = random_model(cfg, spans(cfg)[span_name], seed=heads[0])
    tokens = prompt(100, cfg.vocab_size, 1)
    want = sequence_logits(model, tokens)  # (100, vocab)
    runner = SessionRunner(model, num_blocks=64)
    seq = runner.add_sequence()
    got = torch.cat([runner.step([(seq, tokens[i:i + 17])], all_logits=True) for i in range(0, 100, 17)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("isa", supported_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("span_name", ["causal", "window_sinks", "everything"])
def test_batch_and_chunks_change_no_bit(isa, dtype, span_name):
    """Each sequence's logits alone == in a batch of sequences of other lengths == with its prompt in other
    chunks, bit for bit."""
    cfg = tiny_config(head_dim=64, dim=128, ffn=176)
    model = random_model(cfg, spans(cfg)[span_name], seed=7, dtype=dtype)
    runner = SessionRunner(model, num_blocks=400, isa=isa)
    lengths = [5, 33, 1, 90, 17, 64, 2, 40]
    prompts = [prompt(n, cfg.vocab_size, 10 + i) for i, n in enumerate(lengths)]
    steps = 12

    def run(groups, chunk):
        """Prefill then greedy decode for each group of prompts run together; returns every step's logits."""
        out = {}
        for group in groups:
            seqs = {i: runner.add_sequence() for i in group}
            fed = {i: 0 for i in group}
            logits = {}
            while any(fed[i] < len(prompts[i]) for i in group):
                live = [i for i in group if fed[i] < len(prompts[i])]
                step = runner.step([(seqs[i], prompts[i][fed[i]:fed[i] + chunk]) for i in live])
                for i, row in zip(live, step):
                    fed[i] = min(fed[i] + chunk, len(prompts[i]))
                    logits[i] = row
            for i in group:
                out[i] = [logits[i]]
            for _ in range(steps):
                step = runner.step([(seqs[i], [int(out[i][-1].argmax())]) for i in group])
                for i, row in zip(group, step):
                    out[i].append(row)
            for i in group:
                runner.free(seqs[i])
        return out

    alone = run([[i] for i in range(len(prompts))], chunk=1000)
    batched = run([list(range(len(prompts)))], chunk=16)
    shuffled = run([[7, 3, 0, 5], [1, 6, 2, 4]], chunk=7)
    for i in range(len(prompts)):
        for s in range(steps + 1):
            assert torch.equal(alone[i][s], batched[i][s]), (i, s)
            assert torch.equal(alone[i][s], shuffled[i][s]), (i, s)
    assert runner.num_free_blocks == runner.num_blocks


def test_fork_shares_blocks_and_copies_on_write():
    cfg = tiny_config()
    model = random_model(cfg)
    runner = SessionRunner(model, num_blocks=32)
    tokens = prompt(40, cfg.vocab_size, 2)  # 2.5 blocks
    seq = runner.add_sequence()
    runner.step([(seq, tokens)])
    free_before = runner.num_free_blocks
    twin = runner.fork(seq)
    assert runner.num_free_blocks == free_before  # shared, nothing copied yet
    a = runner.step([(seq, [1]), (twin, [2])])
    assert runner.num_free_blocks == free_before - 1  # the shared partial block was copied once
    want = sequence_logits(model, tokens + [1]), sequence_logits(model, tokens + [2])
    torch.testing.assert_close(a[0], want[0][-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a[1], want[1][-1], atol=1e-4, rtol=1e-4)
    runner.free(seq)
    runner.free(twin)
    assert runner.num_free_blocks == runner.num_blocks


def test_window_frees_blocks_and_runs_past_the_context():
    cfg = tiny_config(max_seq_len=64)
    model = random_model(cfg, SpanBias(window=24, sink_tokens=4))
    runner = SessionRunner(model, num_blocks=8)
    tokens = prompt(300, cfg.vocab_size, 4)
    seq = runner.add_sequence()
    got = []
    for t in tokens:
        got.append(runner.step([(seq, [t])])[0])
        assert runner.blocks_held(seq) <= runner.blocks_for_sequence(runner.length(seq), 1)
    assert runner.blocks_held(seq) <= 4  # sinks' block + the window's
    want = sequence_logits(model, tokens)
    torch.testing.assert_close(torch.stack(got), want, atol=1e-4, rtol=1e-4)


def test_prefix_cache_never_serves_a_block_eviction_changed():
    """Window 24 + 4 sinks with prefix caching: evicting copies the sinks over the first slots of a cached
    prompt block; a later prompt with the same tokens must not start from that block (it would read the
    sinks' keys in their place), and it gets the reference's logits."""
    cfg = tiny_config()
    model = random_model(cfg, SpanBias(window=24, sink_tokens=4))
    runner = SessionRunner(model, num_blocks=16, prefix_caching=True)
    tokens = prompt(64, cfg.vocab_size, 5)
    first = runner.add_sequence()
    runner.step([(first, tokens)])  # 4 full blocks, indexed
    runner.step([(first, [7])])  # evicts 2 blocks (cached as they were); the sinks go into the third
    runner.free(first)
    again = runner.add_sequence()
    assert runner.match_prefix(again, tokens + [9]) == 32  # the chain stops at the changed block
    got = runner.step([(again, tokens[32:] + [9])], all_logits=True)
    torch.testing.assert_close(got, sequence_logits(model, tokens + [9])[32:], atol=1e-4, rtol=1e-4)
    runner.free(again)
    assert runner.num_free_blocks == runner.num_blocks


def test_the_session_and_the_model_forward_evict_alike():
    """One block manager for every route: fed the same stream past a window (two prompt chunks, then one
    token at a time), the session and the model's forward (ModelRunner, eager) hold the same blocks' count
    after every step, within blocks_for_sequence, count the same length and give the same logits."""
    cfg = tiny_config()
    model = random_model(cfg, SpanBias(window=20, sink_tokens=3))
    session, forward = SessionRunner(model, num_blocks=12), ModelRunner(model, num_blocks=12, graphs=False)
    tokens = prompt(200, cfg.vocab_size, 6)
    a, b = session.add_sequence(), forward.add_sequence()
    for feed in [tokens[:37], tokens[37:50]] + [[t] for t in tokens[50:]]:
        torch.testing.assert_close(session.step([(a, feed)]), forward.step([(b, feed)]), atol=1e-4, rtol=1e-4)
        held = session.blocks_held(a)
        assert held == len(forward.cache.manager.blocks(b)) <= session.blocks_for_sequence(session.length(a), len(feed))
        assert session.length(a) == forward.length(b)
    assert forward.cache.evicted(b) > 0


def test_bad_input_raises_and_changes_nothing():
    cfg = tiny_config(max_seq_len=40)
    model = random_model(cfg)
    runner = SessionRunner(model, num_blocks=4)
    seq = runner.add_sequence()
    with pytest.raises(ValueError, match="unknown or freed sequence id 99"):
        runner.step([(99, [1])])
    with pytest.raises(ValueError, match="token id 97"):
        runner.step([(seq, [1, 97])])
    with pytest.raises(ValueError, match="token id -1"):
        runner.step([(seq, [-1])])
    with pytest.raises(ValueError, match="past the model's context of 40"):
        runner.step([(seq, [1] * 41)])
    with pytest.raises(ValueError, match="appears twice"):
        runner.step([(seq, [1]), (seq, [2])])
    with pytest.raises(ValueError, match="new tokens"):
        runner.step([(seq, [])])
    other = runner.add_sequence()
    runner.step([(seq, [1] * 40)])  # 3 blocks of 16
    with pytest.raises(CacheFullError, match="out of blocks"):
        runner.step([(other, [1] * 17)])  # needs 2, 1 is free
    assert runner.length(other) == 0 and runner.num_free_blocks == 1
    runner.step([(other, [1] * 16)])
    with pytest.raises(ValueError, match=f"sequence {other} already holds 16 tokens"):
        runner.match_prefix(other, [1] * 40)
    runner.free(seq)
    runner.free(other)
    assert runner.num_free_blocks == 4
    with pytest.raises(ValueError, match="unknown or freed"):
        runner.free(seq)


def test_weight_map_is_checked():
    from llama_fast.session import weight_map

    cfg = tiny_config()
    model = random_model(cfg)
    weights, owners = weight_map(model)
    from llama_fast import _lite

    session_type = _lite.Session
    args = dict(n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                norm_eps=cfg.norm_eps, max_positions=cfg.max_seq_len, owner=owners, inv_freq=[1.0] * 32,
                alibi_slopes=[], bucket_table=[], window=0, sinks=0, logit_softcap=0.0, scale=0.0, num_blocks=4,
                block_size=16, kv_dtype="F32", num_threads=1, isa="auto")
    session_type(weights=weights, **args)
    missing = dict(weights)
    del missing["layers.1.attention.wk.weight"]
    with pytest.raises(ValueError, match="no tensor 'layers.1.attention.wk.weight'"):
        session_type(weights=missing, **args)
    wrong = dict(weights)
    address, dtype, shape = wrong["layers.0.feed_forward.w2.weight"]
    wrong["layers.0.feed_forward.w2.weight"] = (address, dtype, [shape[0], shape[1] - 1])
    with pytest.raises(ValueError, match="layers.0.feed_forward.w2.weight' must have shape"):
        session_type(weights=wrong, **args)
    extra = dict(weights, **{"layers.2.attention.wq.weight": weights["layers.0.attention.wq.weight"]})
    with pytest.raises(ValueError, match="'layers.2.attention.wq.weight' is not part of the model"):
        session_type(weights=extra, **args)
    with pytest.raises(ValueError, match="dtype must be F32 or BF16"):
        session_type(weights={**weights, "norm.weight": (weights["norm.weight"][0], "F16", [cfg.dim])}, **args)
    with pytest.raises(ValueError, match="sinks"):
        session_type(weights=weights, **dict(args, window=4, sinks=4))


# ---- LLM on the session: the embedded model ----

def shakespeare_prompts(llm, lengths):
    from llama_fast.paths import SAMPLE_TEXT

    text = open(SAMPLE_TEXT, encoding="utf-8").read()
    ids = llm.tokenizer.encode(text)
    return [ids[100 * i:100 * i + n] for i, n in enumerate(lengths)]


@pytest.mark.parametrize("span", [None, SpanBias(window=48, sink_tokens=4)], ids=["dense", "window_sinks"])
def test_every_row_of_a_batch_equals_its_prompt_alone(smollm, span):
    """8 prompts of 5 to 300 tokens, greedy: each row's tokens in the batch are the tokens of its prompt run
    alone (under the window, prompts and generations run far past it), and no block is left behind."""
    from llama_fast.sampling import SamplingParams

    llm = smollm if span is None else smollm.with_span(span)
    prompts = shakespeare_prompts(llm, [5, 300, 17, 64, 150, 9, 230, 100])
    params = [SamplingParams(temperature=0.0)] * len(prompts)

    def run(batch):
        rows = [[] for _ in batch]
        for step in llm.generate_ids(batch, params[:len(batch)], 40, stop_at_eos=False):
            for row, token in enumerate(step):
                if token is not None:
                    rows[row].append(token)
        return rows

    together = run(prompts)
    for prompt, tokens in zip(prompts, together):
        assert run([prompt])[0] == tokens


def test_generate_bad_input_raises_before_any_work(smollm):
    with pytest.raises(ValueError, match="prompt must be"):
        smollm.generate([])
    with pytest.raises(ValueError, match="context is 8192 tokens"):
        smollm.generate("hi " * 9000)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        smollm.generate(["a", "b"], max_new_tokens=0)
    small = smollm.with_span(smollm.model.span)
    small.max_kv_tokens = 64
    with pytest.raises(ValueError, match="more than max_kv_tokens=64 holds"):
        small.generate("hi " * 60, max_new_tokens=20)


def test_a_batch_larger_than_the_kv_pool_runs_in_waves(smollm):
    """max_kv_tokens holds two rows at a time: six rows still all finish, each with its text alone."""
    llm = smollm.with_span(smollm.model.span)
    prompts = ["I love", "The capital of France is", "def fibonacci(n):", "Once upon a time", "Hello", "Why"]
    alone = [llm.generate(p, max_new_tokens=12).token_ids for p in prompts]
    llm.max_kv_tokens = 64  # 4 blocks: two rows of up to 32 tokens
    assert [c.token_ids for c in llm.generate(prompts, max_new_tokens=12)] == alone


def test_rows_of_one_prompt_the_pool_cannot_hold_together_run_one_after_another(smollm):
    """A prompt's rows are forks of one request where the pool holds them together; where it holds one
    row at a time they run as requests of their own, each with its seed's text."""
    llm = smollm.with_span(smollm.model.span)
    kwargs = dict(max_new_tokens=30, temperature=0.8, seed=4)
    together = llm.generate("The sea is", num_return_sequences=3, **kwargs)
    twice = llm.generate(["The sea is", "The sea is"], **kwargs)
    llm.max_kv_tokens = 48  # 3 blocks: one row of up to 48 tokens at a time
    assert [c.text for c in llm.generate("The sea is", num_return_sequences=3, **kwargs)] == [c.text for c in together]
    assert [c.text for c in llm.generate(["The sea is", "The sea is"], **kwargs)] == [c.text for c in twice]


@pytest.mark.parametrize("dims", [
    dict(dim=64, n_heads=1, n_kv_heads=1, head_dim=64, ffn=128),   # head_dim 64, MHA
    dict(dim=100, n_heads=4, n_kv_heads=1, head_dim=128, ffn=203),  # head_dim 128, GQA 4, odd sizes
    dict(dim=90, n_heads=6, n_kv_heads=2, head_dim=18, ffn=77),     # GQA 3, head_dim not a vector multiple
    dict(dim=72, n_heads=36, n_kv_heads=2, head_dim=8, ffn=50),     # GQA 18: a group in two attention calls
])
@pytest.mark.parametrize("isa", supported_isas())
def test_shapes_gqa_and_isas(dims, isa):
    cfg = tiny_config(**dims)
    model = random_model(cfg, SpanBias(window=9, sink_tokens=2), qk_gain=2.0)
    tokens = prompt(40, cfg.vocab_size, 5)
    runner = SessionRunner(model, num_blocks=8, isa=isa)
    assert runner.isa == isa
    seq = runner.add_sequence()
    got = torch.cat([runner.step([(seq, tokens[:23])], all_logits=True)] +
                    [runner.step([(seq, [t])]) for t in tokens[23:]])
    torch.testing.assert_close(got, sequence_logits(model, tokens), atol=1e-4, rtol=1e-4)


def test_long_context_threads_and_bf16():
    """1000 tokens (attention, not the weights, dominates): 1, 2 and 3 threads give the same bits; bf16
    weights and cache stay within bf16's tolerance of the fp32 reference."""
    cfg = tiny_config(max_seq_len=1024)
    model = random_model(cfg, SpanBias(alibi_slopes=alibi_slopes(cfg.n_heads)), qk_gain=2.0)
    tokens = prompt(1000, cfg.vocab_size, 6)
    want = sequence_logits(model, tokens)[-1]
    outs = []
    for threads in (1, 2, 3):
        runner = SessionRunner(model, num_blocks=64, num_threads=threads)
        assert runner.num_threads == threads
        outs.append(runner.step([(runner.add_sequence(), tokens)])[0])
    torch.testing.assert_close(outs[0], want, atol=1e-4, rtol=1e-4)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    half = random_model(cfg, SpanBias(alibi_slopes=alibi_slopes(cfg.n_heads)), qk_gain=2.0, dtype=torch.bfloat16)
    runner = SessionRunner(half, num_blocks=64)
    got = runner.step([(runner.add_sequence(), tokens)])[0]
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


def test_qkv_biases():
    """Qwen2's biases on Q, K and V are added before RoPE."""
    cfg = tiny_config()
    cfg.qkv_bias = True
    model = random_model(cfg, SpanBias(window=16, sink_tokens=2))
    assert "layers.0.attention.wq.bias" in model.state_dict()
    tokens = prompt(50, cfg.vocab_size, 8)
    runner = SessionRunner(model, num_blocks=16)
    got = runner.step([(runner.add_sequence(), tokens)], all_logits=True)
    torch.testing.assert_close(got, sequence_logits(model, tokens), atol=1e-4, rtol=1e-4)


def test_bucket_table_is_the_reference_bucketing():
    from llama_fast.reference import bucket_table, span_bucket

    for num_buckets, max_distance in ((32, 128), (8, 12), (2, 5), (64, 1000)):
        table_span = SpanBias(bucket_bias=torch.arange(num_buckets, dtype=torch.float32)[None].repeat(2, 1),
                              num_buckets=num_buckets, max_distance=max_distance)
        table = bucket_table(table_span)
        assert table.shape == (2, max_distance + 1)
        d = torch.arange(5 * max_distance + 50)
        expected = span_bucket(d, num_buckets, max_distance).float()
        assert torch.equal(table[0][d.clamp(max=max_distance)], expected)


def test_session_route_equals_the_eager_model(smollm):
    """LLM on the session and LLM on the model's forward (decode="eager"): the same greedy tokens, a batch of
    rows of different lengths against each prompt alone."""
    from llama_fast import LLM

    prompts = ["I love", "The quick brown fox jumps over the lazy dog. Then",
               "def fibonacci(n):\n    if n < 2:\n        return n\n"]
    eager = LLM(smollm.model, smollm.tokenizer, decode="eager")
    fast = LLM(smollm.model, smollm.tokenizer, decode="cpp")
    runners = []
    ids = [fast.tokenizer.encode(p) for p in prompts]
    from llama_fast.sampling import SamplingParams

    list(fast.generate_ids(ids, [SamplingParams(temperature=0.0)] * 3, 2, on_cache=runners.append))
    assert isinstance(runners[0], SessionRunner)
    for prompt, together in zip(prompts, fast.generate(prompts, max_new_tokens=24)):
        assert together.token_ids == eager.generate(prompt, max_new_tokens=24).token_ids


def test_decode_choice(smollm, monkeypatch):
    from llama_fast import LLM

    with pytest.raises(ValueError, match="decode"):
        LLM(smollm.model, smollm.tokenizer, decode="fastest")
    monkeypatch.setenv("LLAMA_FAST_BACKEND", "reference")
    assert LLM(smollm.model, smollm.tokenizer).decode == "eager"
    monkeypatch.setenv("LLAMA_FAST_DECODE", "cpp")
    assert LLM(smollm.model, smollm.tokenizer).decode == "cpp"
    half = random_model(tiny_config(), dtype=torch.float16)
    with pytest.raises(RuntimeError, match="float16"):
        list(LLM(half, smollm.tokenizer, decode="cpp").generate_ids([[1, 2]], [None], 2))
