"""The embedded SmolLM2 model through llama_fast against Hugging Face transformers on the same GGUF."""
import pytest
import torch

PROMPTS = [
    "I love",
    "The quick brown fox jumps over the lazy dog. Then",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Paris is the capital of France, and Berlin is the capital of",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(smollm, hf_smollm, prompt):
    hf_model, _ = hf_smollm
    ids = torch.tensor([smollm.tokenizer.encode(prompt)])
    ours = smollm.logits(ids)
    with torch.no_grad():
        theirs = hf_model(ids).logits.float()
    assert ours.shape == theirs.shape == (1, ids.shape[1], 49152)
    assert (ours - theirs).abs().max().item() <= 1e-3


def test_greedy_continuation_matches_transformers(smollm, hf_smollm):
    hf_model, _ = hf_smollm
    prompt_ids = smollm.tokenizer.encode("I love")
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=64, do_sample=False)[0, len(prompt_ids):]
    ours = smollm.generate("I love", max_new_tokens=64, temperature=0)
    assert ours.token_ids == theirs.tolist()


def test_golden_greedy_text(smollm):
    # Golden output (llama2.c style): catches regressions without transformers in the loop.
    out = smollm.generate("I love", max_new_tokens=20)
    assert out.text == " the idea of a community garden, but I'm not sure if it's the right fit for my"
    assert out.finish_reason == "length" and len(out.token_ids) == 20


def test_chat_answers_capital_of_france(smollm):
    reply = smollm.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32)
    assert reply.text == "The capital of France is Paris."
    assert reply.finish_reason == "eos"


def test_batched_prompts_equal_one_by_one(smollm):
    batch = smollm.generate(PROMPTS, max_new_tokens=12)
    for prompt, together in zip(PROMPTS, batch):
        alone = smollm.generate(prompt, max_new_tokens=12)
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text
