"""The model's forward as a runner (llama_fast.model_runner: CUDA, and the eager route decode="eager" here):
generation through its paged cache agrees token for token with recomputing the whole sequence every step
and with the C++ session, and num_return_sequences store their prompt once."""
import torch

from llama_fast import LLM, SamplingParams
from llama_fast.model_runner import ModelRunner

PROMPTS = ["I love", "The capital of France is"]
NEW = 5


def recompute_greedy(llm, prompt: str, n: int) -> list[int]:
    ids = llm.tokenizer.encode(prompt)
    out = []
    for _ in range(n):
        logits = llm.logits(torch.tensor([ids + out]))[0, -1]  # a fresh full forward pass, no cache kept
        out.append(int(logits.argmax()))
    return out


def test_model_runner_recompute_and_session_agree(smollm):
    session = smollm
    eager = LLM(session.model, session.tokenizer, decode="eager")
    runners = []
    batch = eager.generate(PROMPTS, max_new_tokens=NEW)
    singles = [eager.generate(p, max_new_tokens=NEW) for p in PROMPTS]
    on_session = session.generate(PROMPTS, max_new_tokens=NEW)
    list(eager.generate_ids([eager.tokenizer.encode(PROMPTS[0])], [SamplingParams(temperature=0)], 1,
                            on_cache=runners.append))
    assert isinstance(runners[0], ModelRunner) and runners[0].graphs is None
    for i, prompt in enumerate(PROMPTS):
        want = recompute_greedy(eager, prompt, NEW)
        assert batch[i].token_ids[: len(want)] == want[: len(batch[i].token_ids)], prompt
        assert singles[i].token_ids == batch[i].token_ids, prompt
        assert on_session[i].token_ids == batch[i].token_ids, prompt


def test_num_return_sequences_share_the_prompt(smollm):
    eager = LLM(smollm.model, smollm.tokenizer, decode="eager")
    prompt_ids = eager.tokenizer.encode("Once upon a time, in a land far away beyond the seven mountains and the "
                                        "seven seas, where the rivers ran silver under the moon, there lived a")
    n = 3
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + r) for r in range(n)]
    runners, shared = [], []
    steps = []
    for step in eager.generate_ids([prompt_ids] * n, params, 4, on_cache=runners.append):
        steps.append(step)
        cache = runners[0].cache
        if len(steps) == 1:  # the prompt's full blocks are held once, shared by all n rows
            full_blocks = len(prompt_ids) // cache.block_size
            shared = cache.manager.blocks(cache.seq_ids[0])[:full_blocks]
            assert shared and all(cache.manager.refcount(b) == n for b in shared)
    session = [step for step in smollm.generate_ids([prompt_ids] * n, params, 4)]
    assert steps == session
    assert len({tuple(step[r] for step in steps) for r in range(n)}) > 1  # the rows really differ
