"""The PyTorch forward's caches (the eager route, decode="eager"; CUDA uses them too): generation through
the paged cache (batches, num_return_sequences), the static cache (single prompts) and no cache at all
(recomputing the whole sequence every step) agree token for token on the embedded model, and with the C++
session's route."""
import torch

from llama_fast import LLM, PagedKVCache, SamplingParams, StaticKVCache

PROMPTS = ["I love", "The capital of France is"]
NEW = 5


def recompute_greedy(llm, prompt: str, n: int) -> list[int]:
    ids = llm.tokenizer.encode(prompt)
    out = []
    for _ in range(n):
        logits = llm.logits(torch.tensor([ids + out]))[0, -1]  # a fresh full forward pass, no cache kept
        out.append(int(logits.argmax()))
    return out


def with_cache(llm, kind):
    llm.kv_cache = kind
    return llm


def test_paged_static_and_recompute_agree(smollm):
    session = smollm
    smollm = LLM(session.model, session.tokenizer, decode="eager")
    caches = []
    try:
        paged = with_cache(smollm, "auto").generate(PROMPTS, max_new_tokens=NEW)  # 2 rows: paged
        forced = with_cache(smollm, "paged").generate(PROMPTS[0], max_new_tokens=NEW)
        static_batch = with_cache(smollm, "static").generate(PROMPTS, max_new_tokens=NEW)
        smollm.kv_cache = "auto"
        singles = [smollm.generate(p, max_new_tokens=NEW) for p in PROMPTS]  # 1 row: static
        on_session = session.generate(PROMPTS, max_new_tokens=NEW)
        list(smollm.generate_ids([smollm.tokenizer.encode(p) for p in PROMPTS], [SamplingParams(temperature=0)] * 2,
                                 1, on_cache=caches.append))
        list(smollm.generate_ids([smollm.tokenizer.encode(PROMPTS[0])], [SamplingParams(temperature=0)], 1,
                                 on_cache=caches.append))
    finally:
        smollm.kv_cache = "auto"
    assert isinstance(caches[0], PagedKVCache) and isinstance(caches[1], StaticKVCache)
    for i, prompt in enumerate(PROMPTS):
        want = recompute_greedy(smollm, prompt, NEW)
        assert paged[i].token_ids[: len(want)] == want[: len(paged[i].token_ids)], prompt
        assert static_batch[i].token_ids == paged[i].token_ids, prompt
        assert singles[i].token_ids == paged[i].token_ids, prompt
        assert on_session[i].token_ids == paged[i].token_ids, prompt
    assert forced.token_ids == singles[0].token_ids


def test_num_return_sequences_share_the_prompt(smollm):
    smollm = LLM(smollm.model, smollm.tokenizer, decode="eager")
    prompt_ids = smollm.tokenizer.encode("Once upon a time, in a land far away, there lived a")
    n = 3
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + r) for r in range(n)]
    caches = []
    paged = list(smollm.generate_ids([prompt_ids] * n, params, 4, on_cache=caches.append))
    cache = caches[0]
    assert isinstance(cache, PagedKVCache)
    # The prompt's full blocks are held once, shared by all n rows.
    full_blocks = len(prompt_ids) // cache.block_size
    shared = cache.manager.blocks(cache.seq_ids[0])[:full_blocks]
    assert all(cache.manager.refcount(b) == n for b in shared)
    try:
        smollm.kv_cache = "static"
        static = list(smollm.generate_ids([prompt_ids] * n, params, 4))
    finally:
        smollm.kv_cache = "auto"
    assert paged == static
    assert len({tuple(step[r] for step in paged) for r in range(n)}) > 1  # the rows really differ
