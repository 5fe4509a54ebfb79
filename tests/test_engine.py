"""The continuous-batching Engine: scheduling (chunked prefill, preemption), prefix caching, aborts, the
asyncio wrapper and bad input. Load tests run on tiny random models; every text is checked against the
same request run alone."""
import asyncio
import random

import pytest

from llama_fast import LLM, AsyncEngine, Engine, QueueFullError, SamplingParams, SpanBias
from llama_fast.errors import EngineClosedError, StepError
from llama_fast import _ext
from llama_fast.bench import rss_bytes
from llama_fast.config import ModelConfig

from models import random_model

pytestmark = pytest.mark.skipif(not _ext.has_ext(), reason="the C++ extensions are not built")

VOCAB = 300


def tiny_llm(smollm, span=SpanBias(), max_seq_len=4096, seed=0):
    """A random 2-layer model (token ids only; the embedded model's tokenizer turns ids < VOCAB into text)."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, ffn_dim=96,
                      max_seq_len=max_seq_len, head_dim=16)
    return LLM(random_model(cfg, span, seed=seed, qk_gain=3.0), smollm.tokenizer)


def ids(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]  # ids 0-2 are the tokenizer's control tokens


def run(engine, until_empty=True):
    """Steps the engine until nothing is unfinished -> {request id: {index: tokens}}, finish reasons."""
    tokens, reasons = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, {}).setdefault(out.index, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                reasons[(out.request_id, out.index)] = out.finish_reason
    return tokens, reasons


def alone(llm, prompt, max_new_tokens, params=None, **kwargs):
    engine = Engine(llm, prefix_caching=False)
    rid = engine.add_request(prompt, params, max_new_tokens=max_new_tokens, **kwargs)
    return run(engine)[0][rid]


@pytest.fixture(scope="module")
def tiny(smollm):
    return tiny_llm(smollm)


@pytest.mark.parametrize("decode", ["cpp", "eager"])
def test_requests_arriving_while_others_run_get_their_text_alone(tiny, decode):
    """A replayed arrival trace: 12 requests of 5 to 300 prompt tokens arrive at fixed steps while others
    run; each gets the tokens it gets alone, and no block is left held: on the C++ session and on the
    model's forward (ModelRunner)."""
    tiny = LLM(tiny.model, tiny.tokenizer, decode=decode)
    rng = random.Random(1)
    trace = [(step, ids(rng.randrange(5, 300), seed), rng.randrange(5, 40)) for seed, step in
             enumerate(sorted(rng.randrange(0, 60) for _ in range(12)))]
    engine = Engine(tiny, max_batch_tokens=96, max_kv_tokens=4096)
    got, step = {}, 0
    pending = list(trace)
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, prompt, new = pending.pop(0)
            got[engine.add_request(prompt, max_new_tokens=new, ignore_eos=True)] = (prompt, new, [])
        for out in engine.step():
            got[out.request_id][2].extend(out.new_token_ids)
        step += 1
    for prompt, new, tokens in got.values():
        assert len(tokens) == new
        assert tokens == alone(tiny, prompt, new, ignore_eos=True)[0]
    assert engine.stats()["blocks_in_use"] == 0


def test_a_long_prompt_never_stalls_running_streams(tiny):
    """4 streams decoding, a 2,000-token prompt arrives: no step feeds more than max_batch_tokens tokens and
    every running stream gets a token at every step until the prompt is in (counted, not timed)."""
    engine = Engine(tiny, max_batch_tokens=64, max_kv_tokens=8192)
    fed = []
    step = engine.runner.step

    def counting_step(entries, **kwargs):
        fed.append(sum(len(tokens) for _, tokens in entries))
        return step(entries, **kwargs)

    engine.runner.step = counting_step
    streams = {engine.add_request(ids(20, s), max_new_tokens=200, ignore_eos=True) for s in range(4)}
    produced = set()
    while not produced >= streams:  # until all four decode
        produced |= {out.request_id for out in engine.step()}
    long = engine.add_request(ids(2000, 9), max_new_tokens=4, ignore_eos=True)
    steps = 0
    while True:
        produced = {out.request_id for out in engine.step()}
        steps += 1
        assert produced >= streams  # each running stream got its token in this step
        if long in produced:
            break
    assert steps >= 2000 / 60 and max(fed) <= 64
    engine.abort_all()
    assert engine.stats()["blocks_in_use"] == 0


def test_prefix_caching_reuses_a_shared_system_prompt(tiny):
    """8 requests sharing a 500-token system prompt, one after another and then all at once: requests 2-8
    compute at most 10% of the prompt tokens the first computed, with the same tokens as without caching."""
    system = ids(500, 42)
    prompts = [system + ids(8, 100 + i) for i in range(8)]
    plain = Engine(tiny, prefix_caching=False)
    want = [run_one(plain, p) for p in prompts]

    cached = Engine(tiny)
    computed = []
    for p, w in zip(prompts, want):
        before = cached.stats()["prompt_tokens_computed"]
        assert run_one(cached, p) == w
        computed.append(cached.stats()["prompt_tokens_computed"] - before)
    assert computed[0] == len(prompts[0])
    assert all(c <= 0.1 * computed[0] for c in computed[1:]), computed

    together = Engine(tiny)
    rids = [together.add_request(p, max_new_tokens=12, ignore_eos=True) for p in prompts]
    tokens, _ = run(together)
    assert [tokens[r][0] for r in rids] == want
    stats = together.stats()
    assert stats["prompt_tokens_computed"] <= len(prompts[0]) + 7 * 0.1 * len(prompts[0])
    assert stats["prompt_tokens_cached"] >= 7 * 496 and stats["blocks_in_use"] == 0 and stats["blocks_cached"] > 0


def run_one(engine, prompt, new=12):
    rid = engine.add_request(prompt, max_new_tokens=new, ignore_eos=True)
    return run(engine)[0][rid][0]


def test_prefix_caching_under_a_window_gives_the_uncached_text(smollm):
    llm = tiny_llm(smollm, span=SpanBias(window=40, sink_tokens=4))
    system = ids(200, 5)
    prompts = [system + ids(10, 200 + i) for i in range(4)]
    want = [run_one(Engine(llm, prefix_caching=False), p, 60) for p in prompts]
    cached = Engine(llm)
    assert [run_one(cached, p, 60) for p in prompts] == want
    assert cached.stats()["prompt_tokens_cached"] > 0


@pytest.mark.parametrize("decode", ["cpp", "eager"])
def test_more_requests_than_the_pool_holds_all_finish_by_preemption(tiny, decode):
    """A pool of 40 blocks for 16 requests that each need up to 12: all finish, some by being preempted and
    computed again, each with its text alone (on either runner)."""
    tiny = LLM(tiny.model, tiny.tokenizer, decode=decode)
    rng = random.Random(3)
    requests = [(ids(rng.randrange(20, 120), 50 + i), rng.randrange(30, 70)) for i in range(16)]
    engine = Engine(tiny, max_kv_tokens=40 * 16, max_batch_tokens=128, prefix_caching=False)
    rids = [engine.add_request(p, max_new_tokens=n, ignore_eos=True) for p, n in requests]
    tokens, reasons = run(engine)
    assert engine.stats()["preemptions"] > 0
    for rid, (p, n) in zip(rids, requests):
        assert tokens[rid][0] == alone(tiny, p, n, ignore_eos=True)[0]
        assert reasons[(rid, 0)] == "length"
    assert engine.stats()["blocks_in_use"] == 0


def test_two_thousand_requests_with_aborts_leave_no_block_and_no_memory_behind(tiny):
    """2,000 requests of random lengths, some aborted at random steps, through a small pool (preemptions):
    blocks in use return to zero, RSS stays flat, and the ones that finish get their text alone."""
    rng = random.Random(7)
    engine = Engine(tiny, max_kv_tokens=64 * 16, max_batch_tokens=128, max_running=32)
    live, finished, aborted = {}, {}, 0
    rss = []
    for i in range(2000):
        prompt, new = ids(rng.randrange(1, 60), 1000 + i), rng.randrange(1, 24)
        live[engine.add_request(prompt, SamplingParams(temperature=0.0), max_new_tokens=new, ignore_eos=True)] = (prompt, new, [])
        if i % 4 == 3:
            for out in engine.step():
                if out.finish_reason == "abort":
                    continue
                live[out.request_id][2].extend(out.new_token_ids)
                if out.finish_reason is not None:
                    finished[out.request_id] = live.pop(out.request_id)
            if rng.random() < 0.2 and live:
                rid = rng.choice(list(live))
                engine.abort(rid)
                del live[rid]
                aborted += 1
        if i in (400, 1999):
            rss.append(rss_bytes() / 2**20)
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id in live:
                live[out.request_id][2].extend(out.new_token_ids)
                if out.finish_reason is not None:
                    finished[out.request_id] = live.pop(out.request_id)
    assert not live and aborted > 50 and len(finished) + aborted == 2000
    stats = engine.stats()
    assert stats["blocks_in_use"] == 0 and stats["running"] == stats["waiting"] == 0
    assert rss[1] - rss[0] < 64, rss
    for prompt, new, tokens in rng.sample(list(finished.values()), 12):
        assert tokens == alone(tiny, prompt, new, ignore_eos=True)[0]


def test_n_forks_compute_the_prompt_once_and_draw_from_seed_plus_index(tiny):
    prompt = ids(70, 11)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=5)
    engine = Engine(tiny)
    rid = engine.add_request(prompt, params, max_new_tokens=20, n=3, ignore_eos=True)
    tokens, _ = run(engine)
    assert engine.stats()["prompt_tokens_computed"] == len(prompt)
    for i in range(3):
        one = SamplingParams(temperature=0.9, top_p=0.95, seed=5 + i)
        assert tokens[rid][i] == alone(tiny, prompt, 20, one, ignore_eos=True)[0]
    assert len({tuple(t) for t in tokens[rid].values()}) == 3


def test_max_new_tokens_none_fills_what_the_context_and_the_pool_leave(tiny):
    """No max_new_tokens (a chat request without max_tokens): each of n sequences may run to the end of
    the context, or to what the KV pool holds for all n, whichever comes first."""
    prompt = ids(100, 12)
    roomy = Engine(tiny)
    rid = roomy.add_request(prompt, max_new_tokens=None, ignore_eos=True)
    assert roomy._requests[rid].max_new_tokens == tiny.config.max_seq_len - len(prompt)
    roomy.abort(rid)
    engine = Engine(tiny, max_kv_tokens=1024)
    rid = engine.add_request(prompt, max_new_tokens=None, n=6, ignore_eos=True)
    limit = engine._requests[rid].max_new_tokens
    assert engine.fits(len(prompt) + limit, 6) and not engine.fits(len(prompt) + limit + 16, 6)
    tokens, reasons = run(engine)
    assert all(len(t) == limit for t in tokens[rid].values()) and set(reasons.values()) == {"length"}
    assert engine.stats()["blocks_in_use"] == 0


def test_stop_strings_min_tokens_and_logprobs(smollm):
    engine = Engine(smollm)
    bare = "Write a short poem about the sea."  # the instruct model's greedy continuation is its end token
    rid = engine.add_request(bare, max_new_tokens=10)
    tokens, reasons = run(engine)
    assert len(tokens[rid][0]) == 1 and reasons[(rid, 0)] == "stop"
    rid = engine.add_request(bare, max_new_tokens=10, min_tokens=4)
    tokens, _ = run(engine)
    assert len(tokens[rid][0]) >= 4 and not set(tokens[rid][0][:4]) & engine._eos

    want = smollm.generate("The capital of France is", max_new_tokens=30).text
    stop = want.split()[3]
    rid = engine.add_request("The capital of France is", max_new_tokens=30, stop=stop)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert "".join(o.new_text for o in outs) == want[:want.index(stop)]
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == stop

    rid = engine.add_request("The capital of France is", SamplingParams(temperature=0.0, logprobs=3), max_new_tokens=5)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    for out in outs:
        (chosen, top), = out.logprobs
        assert len(top) == 3 and top[0][0] == out.new_token_ids[0] and chosen == pytest.approx(top[0][1])
        assert top[0][1] >= top[1][1] >= top[2][1] and chosen <= 0


def test_bad_requests_raise_naming_the_argument_and_disturb_nothing(tiny):
    engine = Engine(tiny, max_kv_tokens=512, max_waiting=3)
    prompt = ids(40, 1)
    want = alone(tiny, prompt, 30, ignore_eos=True)[0]
    rid = engine.add_request(prompt, max_new_tokens=30, ignore_eos=True, request_id="mine")
    first = [t for out in engine.step() for t in out.new_token_ids]
    with pytest.raises(ValueError, match="abort: no unfinished request with id 'nope'"):
        engine.abort("nope")
    with pytest.raises(ValueError, match="request_id 'mine' is already in use"):
        engine.add_request(prompt, request_id="mine")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        engine.add_request(prompt, max_new_tokens=0)
    with pytest.raises(ValueError, match="5000 tokens; the model's context is 4096"):
        engine.add_request(ids(5000, 2))
    with pytest.raises(ValueError, match="more than max_kv_tokens=512"):
        engine.add_request(ids(400, 2), max_new_tokens=200)
    with pytest.raises(ValueError, match="a prompt must contain at least one token"):
        engine.add_request([])
    with pytest.raises(ValueError, match="n must be >= 1"):
        engine.add_request(prompt, n=0)
    with pytest.raises(ValueError, match="list of n=2"):
        engine.add_request(prompt, [SamplingParams()], n=2)
    with pytest.raises(ValueError, match="max_running"):
        Engine(tiny, max_running=100, max_batch_tokens=50)
    for _ in range(3):
        engine.add_request(ids(10, 3), max_new_tokens=2)
    with pytest.raises(QueueFullError, match="3 requests are waiting"):
        engine.add_request(ids(10, 3))
    tokens, _ = run(engine)
    assert first + tokens[rid][0] == want and engine.stats()["blocks_in_use"] == 0


def test_a_step_that_fails_aborts_its_requests_and_the_engine_goes_on(tiny, monkeypatch):
    """An exception in a step's bookkeeping (a bug) reaches the caller; that step's requests are aborted, so
    no sequence is left half-advanced (never scheduled again, its blocks held), and the next ones run."""
    engine = Engine(tiny)
    engine.add_request(ids(20, 5), max_new_tokens=8, n=2, request_id="r")
    engine.step()
    monkeypatch.setattr(engine, "_sample", lambda *args: 1 / 0)
    with pytest.raises(StepError, match=r"an engine step failed \(ZeroDivisionError: division by zero\); its "
                                        r"requests r were aborted") as info:
        engine.step()
    assert info.value.request_ids == ["r"] and isinstance(info.value.__cause__, ZeroDivisionError)
    monkeypatch.undo()
    assert {out.finish_reason for out in engine.step()} == {"abort"}
    assert not engine.has_unfinished() and engine.stats()["blocks_in_use"] == 0
    engine.add_request(ids(20, 5), max_new_tokens=8, request_id="r")   # the runner's own failure alike
    monkeypatch.setattr(engine.runner, "step", lambda *args: 1 / 0)
    with pytest.raises(StepError, match="its requests r were aborted"):
        engine.step()
    monkeypatch.undo()
    assert {out.finish_reason for out in engine.step()} == {"abort"} and not engine.has_unfinished()
    rid = engine.add_request(ids(20, 5), max_new_tokens=8, ignore_eos=True)
    assert run(engine)[0][rid][0] == alone(tiny, ids(20, 5), 8, ignore_eos=True)[0]


def test_a_failing_step_keeps_what_it_finished_and_reports_it(tiny, monkeypatch):
    """A failure while appending one request's token: the request that step finished earlier still gets its
    last token and finish reason (reported by the next step, not named in the StepError)."""
    engine = Engine(tiny)
    want = alone(tiny, ids(20, 8), 3, ignore_eos=True)[0]
    engine.add_request(ids(20, 8), max_new_tokens=3, ignore_eos=True, request_id="done")
    engine.add_request(ids(20, 9), max_new_tokens=30, ignore_eos=True, request_id="doomed")
    got = [t for _ in range(2) for out in engine.step() if out.request_id == "done" for t in out.new_token_ids]
    append = engine._append
    monkeypatch.setattr(engine, "_append", lambda seq, token, lp: 1 / 0 if seq.request.request_id == "doomed"
                        else append(seq, token, lp))
    with pytest.raises(StepError) as info:
        engine.step()
    assert info.value.request_ids == ["doomed"]
    monkeypatch.undo()
    last = {out.request_id: out for out in engine.step()}
    assert got + last["done"].new_token_ids == want and last["done"].finish_reason == "length"
    assert last["doomed"].finish_reason == "abort"
    assert not engine.has_unfinished() and engine.stats()["blocks_in_use"] == 0


@pytest.mark.parametrize("where", ["runner", "sampler"])
def test_an_interrupt_in_a_step_aborts_its_requests_and_reaches_the_caller(tiny, monkeypatch, where):
    """Ctrl-C lands after the session's step returned (the cache then holds the step, the engine's counts not
    yet) or while sampling: KeyboardInterrupt reaches the caller as it is, the step's requests are aborted
    (not fed the step again, nor left unscheduled with their blocks held), and the engine goes on."""
    engine = Engine(tiny)
    engine.add_request(ids(20, 10), max_new_tokens=12, ignore_eos=True, request_id="r")
    engine.step()

    def interrupted(original):
        def call(*args):
            original(*args)
            raise KeyboardInterrupt
        return call

    if where == "runner":
        monkeypatch.setattr(engine.runner, "step", interrupted(engine.runner.step))
    else:
        monkeypatch.setattr(engine, "_sample", interrupted(engine._sample))
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    monkeypatch.undo()
    assert [(out.request_id, out.finish_reason) for out in engine.step()] == [("r", "abort")]
    assert not engine.has_unfinished() and engine.stats()["blocks_in_use"] == 0
    rid = engine.add_request(ids(20, 10), max_new_tokens=12, ignore_eos=True)
    assert run(engine)[0][rid][0] == alone(tiny, ids(20, 10), 12, ignore_eos=True)[0]


def test_an_embedding_padded_past_the_tokenizer_is_never_a_token(smollm, monkeypatch):
    """Qwen2 and Phi-3 pad their embedding past the tokenizer's vocabulary: the padded ids have no text, so a
    request that detokenizes refuses them in its prompt and never samples them, even where their logits are
    the largest; one that does not (token ids in, token ids out) takes them."""
    words = smollm.tokenizer.vocab_size
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=words + 64, ffn_dim=96, head_dim=16)
    engine = Engine(LLM(random_model(cfg, seed=1), smollm.tokenizer))
    with pytest.raises(ValueError, match=rf"prompt token ids past the tokenizer's {words} have no text"):
        engine.add_request([5, 6, words + 10])
    engine.add_request([5, 6, words + 10], max_new_tokens=2, detokenize=False)
    step = engine.runner.step

    def padded_ids_lead(entries):
        logits = step(entries)
        logits[:, words:] = 1e4
        return logits

    monkeypatch.setattr(engine.runner, "step", padded_ids_lead)
    rids = [engine.add_request([5, 6, 7], SamplingParams(temperature=t, seed=0), max_new_tokens=20, ignore_eos=True)
            for t in (0.0, 1.0)]
    raw = engine.add_request([5, 6, 7], max_new_tokens=3, ignore_eos=True, detokenize=False)
    tokens, reasons = run(engine)
    assert all(0 <= t < words for r in rids for t in tokens[r][0]) and set(reasons.values()) == {"length"}
    assert all(t >= words for t in tokens[raw][0])


def test_a_request_id_is_free_again_once_its_request_and_its_stream_are_done_with_it(tiny):
    """Reusing an id: refused while the abort of the request that had it waits to be reported (the report
    would name both); in AsyncEngine a stream dropped or closed after its request finished leaves alone the
    later request that took its id (it used to abort that one, whose stream then hung)."""
    engine = Engine(tiny)
    engine.add_request(ids(20, 11), max_new_tokens=8, request_id="x")
    engine.step()
    engine.abort("x")
    with pytest.raises(ValueError, match="request_id 'x' was aborted and the next step reports it"):
        engine.add_request(ids(20, 11), max_new_tokens=8, request_id="x")
    assert [out.finish_reason for out in engine.step()] == ["abort"]
    engine.add_request(ids(20, 11), max_new_tokens=8, ignore_eos=True, request_id="x")
    assert run(engine)[0]["x"][0] == alone(tiny, ids(20, 11), 8, ignore_eos=True)[0]
    want = alone(tiny, ids(20, 12), 3, ignore_eos=True)[0]

    async def main():
        aengine = AsyncEngine(Engine(tiny))

        async def finished_unread(close):
            stream = aengine.generate(ids(20, 12), max_new_tokens=3, ignore_eos=True, request_id="y")
            async for _ in stream:
                break
            while aengine.engine.has_unfinished():  # "y" finishes in the engine, its last outputs unread
                await asyncio.sleep(0.01)
            if close:
                await stream.aclose()
                return None
            return stream

        results = []
        for close in (False, True):
            stream = await finished_unread(close)
            again = aengine.generate(ids(20, 12), max_new_tokens=3, ignore_eos=True, request_id="y")
            del stream  # dropped after its id was taken again (or closed before)
            results.append(await asyncio.wait_for(_tokens(again), 10))
        await aengine.shutdown(timeout=5)
        return results

    assert asyncio.run(main()) == [want, want]


async def _tokens(stream) -> list[int]:
    return [t async for out in stream for t in out.new_token_ids]


def test_a_failed_step_reaches_only_the_async_streams_it_ran(tiny, monkeypatch):
    """max_running=1: the first request runs alone when its step fails; the queued one goes on, whole."""
    async def main():
        aengine = AsyncEngine(Engine(tiny, max_running=1))
        fail = aengine.engine._finish_step
        monkeypatch.setattr(aengine.engine, "_finish_step", lambda plan, logits, produced: 1 / 0 if any(
            seq.request.request_id == "doomed" for seq, _ in plan) else fail(plan, logits, produced))

        async def collect(request_id):
            tokens = []
            async for out in aengine.generate(ids(20, 6), max_new_tokens=8, ignore_eos=True, request_id=request_id):
                tokens += out.new_token_ids
            return tokens

        results = await asyncio.gather(collect("doomed"), collect("fine"), return_exceptions=True)
        await aengine.shutdown(timeout=5)
        return results

    doomed, fine = asyncio.run(main())
    assert isinstance(doomed, StepError) and doomed.request_ids == ["doomed"]
    assert fine == alone(tiny, ids(20, 6), 8, ignore_eos=True)[0]


def test_engine_runs_the_model_forward_where_the_session_does_not(smollm):
    """decode="eager": the same Engine steps a ModelRunner (the model's forward over a paged cache) and
    gives the session's greedy tokens, prompts of different lengths running together."""
    from llama_fast.model_runner import ModelRunner

    prompts = [smollm.tokenizer.encode(p) for p in ("I love", "The capital of France is a city that")]
    outputs = {}
    for decode in ("eager", "cpp"):
        engine = Engine(LLM(smollm.model, smollm.tokenizer, decode=decode))
        assert isinstance(engine.runner, ModelRunner) == (decode == "eager")
        rids = [engine.add_request(p, max_new_tokens=12, ignore_eos=True) for p in prompts]
        tokens, _ = run(engine)
        outputs[decode] = [tokens[r][0] for r in rids]
        assert engine.stats()["blocks_in_use"] == 0
    assert outputs["eager"] == outputs["cpp"]


def test_async_engine_streams_concurrent_requests_and_aborts_on_close(tiny):
    prompts = [ids(30 + 10 * i, 70 + i) for i in range(4)]
    want = [alone(tiny, p, 25, ignore_eos=True)[0] for p in prompts]

    async def main():
        aengine = AsyncEngine(Engine(tiny))

        async def collect(prompt):
            tokens = []
            async for out in aengine.generate(prompt, max_new_tokens=25, ignore_eos=True):
                tokens += out.new_token_ids
            return tokens

        got = await asyncio.gather(*(collect(p) for p in prompts))
        stream = aengine.generate(prompts[0], max_new_tokens=200, ignore_eos=True)
        async for _ in stream:
            break
        await stream.aclose()  # the client went away: aborted, blocks freed within a step
        unread = aengine.generate(prompts[1], max_new_tokens=200, ignore_eos=True)
        await unread.aclose()  # closed before it was ever read (a request refused halfway): aborted too
        task = asyncio.ensure_future(anext(aengine.generate(prompts[2], max_new_tokens=200, ignore_eos=True)))
        await asyncio.sleep(0)
        task.cancel()  # the task waiting on it was cancelled: aborted
        async for _ in aengine.generate(prompts[3], max_new_tokens=200, ignore_eos=True):
            break  # dropped unfinished: aborted by the stepping thread
        for _ in range(100):
            if aengine.stats()["blocks_in_use"] == 0 and not aengine.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        stats = aengine.stats()
        with pytest.raises(ValueError, match="max_new_tokens"):
            aengine.generate(prompts[0], max_new_tokens=-1)
        await aengine.shutdown(timeout=5)
        with pytest.raises(EngineClosedError, match="shutting down"):
            aengine.generate(prompts[0])
        return got, stats

    got, stats = asyncio.run(main())
    assert got == want
    assert stats["blocks_in_use"] == 0 and stats["running"] == 0 and stats["waiting"] == 0


def test_requests_added_and_aborted_from_another_thread_while_it_steps(tiny):
    """One thread steps; another adds requests and aborts some mid-step (add_request and abort do not wait
    for a step's computation): no block is left held, and the requests not aborted get their text alone."""
    import threading

    engine = Engine(tiny, max_kv_tokens=2048)
    rng = random.Random(5)
    got, done = {}, threading.Event()

    def stepper():
        while not done.is_set() or engine.has_unfinished():
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)

    thread = threading.Thread(target=stepper)
    thread.start()
    prompts = {}
    for i in range(40):
        prompt = ids(rng.randrange(5, 80), 300 + i)
        rid = engine.add_request(prompt, max_new_tokens=15, ignore_eos=True)
        prompts[rid] = prompt
        if i % 3 == 0:
            try:
                engine.abort(rng.choice(list(prompts)))
            except ValueError:
                pass  # it had finished
    done.set()
    thread.join(timeout=120)
    assert not thread.is_alive() and engine.stats()["blocks_in_use"] == 0
    finished = [rid for rid in prompts if len(got.get(rid, [])) == 15]
    assert len(finished) >= 20
    for rid in finished[:8]:
        assert got[rid] == alone(tiny, prompts[rid], 15, ignore_eos=True)[0]
