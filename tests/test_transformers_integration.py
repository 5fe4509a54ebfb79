"""llama_fast.integrations.transformers: the "llama_fast" attention against "sdpa", LLM.from_transformers and
generate() against transformers' own generate, on the embedded model (through transformers' GGUF loader)
and on tiny random Llama, Mistral and Qwen2 models."""
import copy
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llama_fast.integrations.transformers as lf_hf  # noqa: E402
from llama_fast import LLM, SamplingParams, SpanBias  # noqa: E402
from llama_fast.bench import rss_bytes  # noqa: E402
from llama_fast.span import alibi_slopes  # noqa: E402

PROMPTS = ["I love", "The quick brown fox jumps over the lazy dog. Then", "def fibonacci(n):\n    if n < 2:"]


def twin(model, attn="llama_fast"):
    """A copy of `model` (same weights) running attention `attn`."""
    other = copy.deepcopy(model)
    other.set_attn_implementation(attn)
    return other.eval()


def tiny(kind: str, seed: int = 0, **overrides):
    """A tiny random LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM (fp32, "sdpa")."""
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    settings = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                    num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0, tie_word_embeddings=False)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**settings)).eval()
    with torch.no_grad():  # larger than the default init: attention patterns (and windows) then matter
        for name, p in model.named_parameters():
            if "proj" in name and p.dim() == 2:
                p.normal_(0, 0.3)
            elif "bias" in name:
                p.normal_(0, 0.5)
    model.set_attn_implementation("sdpa")
    return model


def left_padded(batch: list[list[int]], pad: int):
    longest = max(map(len, batch))
    ids = torch.tensor([[pad] * (longest - len(r)) + r for r in batch])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in batch])
    return ids, mask


def random_prompts(vocab: int, lengths, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def smol_lf(hf_smollm):
    """The embedded model through transformers with attn_implementation="llama_fast", fp32."""
    from transformers import AutoModelForCausalLM

    from llama_fast.loaders import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32, attn_implementation="llama_fast").eval()


# ----------------------------------------------------------------------------------------------------
# The attention function itself: its fast path (no mask: ops.decode_attention) against its reference path
# (the same causal pattern as an explicit mask: reference.masked_attention), fresh inputs, odd sizes.


class _Module(torch.nn.Module):
    def __init__(self, heads, span=None):
        super().__init__()
        self.config = transformers.LlamaConfig(num_attention_heads=heads, num_key_value_heads=1, hidden_size=8 * heads)
        if span is not None:
            self.config.llama_fast_span = span
        self.is_causal = True


@pytest.mark.parametrize("B,H,Hkv,Tq,Tk,D", [(1, 3, 1, 7, 7, 16), (2, 4, 2, 1, 13, 8), (3, 6, 3, 5, 5, 32),
                                              (2, 2, 2, 1, 1, 8)])
@pytest.mark.parametrize("span_kind", ["causal", "window_sinks", "alibi_softcap"])
def test_attention_fast_path_equals_masked_reference(B, H, Hkv, Tq, Tk, D, span_kind):
    torch.manual_seed(B * 100 + Tq * 10 + Tk)
    span = {"causal": None, "window_sinks": SpanBias(window=3, sink_tokens=1),
            "alibi_softcap": SpanBias(alibi_slopes=alibi_slopes(H), logit_softcap=2.5)}[span_kind]
    module = _Module(H, span)
    q, k, v = torch.randn(B, H, Tq, D), torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    fast, _ = lf_hf.attention_forward(module, q, k, v, None, scaling=D ** -0.5)
    causal = torch.ones(B, 1, Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
    ref, _ = lf_hf.attention_forward(module, q, k, v, causal, scaling=D ** -0.5)
    assert fast.shape == (B, Tq, H, D)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=1e-5)
    if span_kind == "causal" and Tq == Tk:  # and plain causal attention is SDPA's
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1), is_causal=True).transpose(1, 2)
        torch.testing.assert_close(fast, sdpa, atol=2e-5, rtol=1e-5)


def test_attention_rejects_what_it_cannot_honour():
    module = _Module(2)
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="dropout"):
        lf_hf.attention_forward(module, q, k, k, None, dropout=0.1)
    module.is_causal = False
    with pytest.raises(ValueError, match="causal"):
        lf_hf.attention_forward(module, q, k, k, None)
    module = _Module(2, SpanBias(window=4, sink_tokens=2))
    with pytest.raises(ValueError, match="sliding_window"):
        lf_hf.attention_forward(module, q, k, k, None, sliding_window=8)
    module = _Module(2, SpanBias(alibi_slopes=alibi_slopes(3)))
    with pytest.raises(ValueError, match="alibi_slopes has 3 heads"):
        lf_hf.attention_forward(module, q, k, k, None)


# ----------------------------------------------------------------------------------------------------
# The embedded model through transformers' GGUF loader, fp32: "llama_fast" against "sdpa".


def test_embedded_logits_match_sdpa_unpadded(hf_smollm, smol_lf):
    hf, tok = hf_smollm
    ids = torch.tensor([tok(PROMPTS[1])["input_ids"]])
    with torch.no_grad():
        theirs, ours = hf(ids).logits, smol_lf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_embedded_logits_match_sdpa_left_padded_batch_of_3(hf_smollm, smol_lf):
    hf, tok = hf_smollm
    ids, mask = left_padded([tok(p)["input_ids"] for p in PROMPTS], tok.pad_token_id or 0)
    assert len(set(mask.sum(1).tolist())) == 3  # three lengths: two rows padded
    with torch.no_grad():
        theirs, ours = hf(ids, attention_mask=mask).logits, smol_lf(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


def test_embedded_greedy_generate_64_matches_sdpa(hf_smollm, smol_lf):
    hf, tok = hf_smollm
    ids = torch.tensor([tok("I love")["input_ids"]])
    with torch.no_grad():
        theirs = hf.generate(ids, do_sample=False, max_new_tokens=64)
        ours = smol_lf.generate(ids, do_sample=False, max_new_tokens=64)
    assert ours.shape == (1, ids.shape[1] + 64)
    assert torch.equal(ours, theirs)


def test_embedded_batched_left_padded_and_static_cache_generate_match_sdpa(hf_smollm, smol_lf):
    hf, tok = hf_smollm
    ids, mask = left_padded([tok(p)["input_ids"] for p in PROMPTS], tok.pad_token_id or 0)
    with torch.no_grad():
        for extra in ({}, {"cache_implementation": "static"}):
            kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=0, **extra)
            assert torch.equal(smol_lf.generate(ids, **kwargs), hf.generate(ids, **kwargs)), extra


def test_past_key_values_chunks_match_sdpa():
    """A prompt fed in chunks through transformers' DynamicCache (the later chunks attend to a cache with
    an explicit mask), left-padded rows included."""
    sdpa = tiny("llama", seed=3)
    ours = twin(sdpa)
    ids, mask = left_padded(random_prompts(101, [11, 7, 9], seed=4), 0)
    outs = []
    with torch.no_grad():
        for model in (sdpa, ours):
            cache, logits = transformers.DynamicCache(config=model.config), []
            for start, end in ((0, 5), (5, 6), (6, 11)):
                out = model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache, use_cache=True)
                logits.append(out.logits)
            outs.append(torch.cat(logits, 1))
    real = mask.bool()
    assert (outs[0][real] - outs[1][real]).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------------------------------
# Sliding windows, spans, Qwen2


def test_mistral_sliding_window_matches_sdpa():
    sdpa = tiny("mistral", seed=5, sliding_window=4)
    ours = twin(sdpa)
    no_window = twin(tiny("mistral", seed=5, sliding_window=None), "sdpa")
    ids, mask = left_padded(random_prompts(101, [13, 9], seed=6), 0)
    with torch.no_grad():
        theirs = sdpa(ids, attention_mask=mask).logits
        mine = ours(ids, attention_mask=mask).logits
        unwindowed = no_window(ids, attention_mask=mask).logits
        real = mask.bool()
        assert (mine[real] - theirs[real]).abs().max().item() <= 1e-4
        assert (unwindowed[real] - theirs[real]).abs().max().item() > 1e-2  # the window matters here
        one = ids[:1]  # unpadded: the mask-free fast path with the window
        assert (ours(one).logits - sdpa(one).logits).abs().max().item() <= 1e-4
        kwargs = dict(do_sample=False, max_new_tokens=10)
        assert torch.equal(ours.generate(one, **kwargs), sdpa.generate(one, **kwargs))


def test_qwen2_sliding_window_on_every_layer_matches_sdpa_and_some_layers_are_refused():
    """use_sliding_window with max_window_layers=0 slides on every layer: one window, as Mistral's (it was
    refused as per-layer windows); from the second layer on it is per-layer, which is refused."""
    sdpa = tiny("qwen2", seed=8, use_sliding_window=True, sliding_window=4, max_window_layers=0)
    one = torch.tensor(random_prompts(101, [13], seed=9))
    with torch.no_grad():
        theirs = sdpa.generate(one, do_sample=False, max_new_tokens=10)
        torch.testing.assert_close(LLM.from_transformers(sdpa).logits(one), sdpa(one).logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(lf_hf.generate(sdpa, one, do_sample=False, max_new_tokens=10), theirs)
    with pytest.raises(ValueError, match="some layers only"):
        LLM.from_transformers(tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1))


@pytest.mark.parametrize("span", [SpanBias(window=5, sink_tokens=2), SpanBias(alibi_slopes=alibi_slopes(6)),
                                  SpanBias(logit_softcap=3.0)], ids=["window_sinks", "alibi", "softcap"])
def test_config_span_matches_llama_fast_model(span):
    """config.llama_fast_span in transformers' forward gives llama_fast's own model's logits, and a
    left-padded row its unpadded logits (padding does not move the sinks)."""
    model = tiny("llama", seed=7)
    model.config.llama_fast_span = span
    model.set_attn_implementation("llama_fast")
    llm = LLM.from_transformers(model)
    assert llm.model.span is span
    rows = random_prompts(101, [12, 8], seed=8)
    ids, mask = left_padded(rows, 0)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        for b, row in enumerate(rows):
            alone = model(torch.tensor([row])).logits[0]
            torch.testing.assert_close(batch[b, -len(row):], alone, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(alone, llm.logits(torch.tensor([row]))[0], atol=1e-4, rtol=1e-4)


def test_qwen2_biases_match_sdpa_and_from_transformers():
    sdpa = tiny("qwen2", seed=9)
    ours = twin(sdpa)
    ids, mask = left_padded(random_prompts(101, [10, 6], seed=10), 0)
    with torch.no_grad():
        real = mask.bool()
        assert (ours(ids, attention_mask=mask).logits[real] - sdpa(ids, attention_mask=mask).logits[real]).abs().max() <= 1e-4
        llm = LLM.from_transformers(sdpa)
        assert llm.config.qkv_bias
        prompt = ids[:1]
        theirs = sdpa.generate(prompt, do_sample=False, max_new_tokens=16, eos_token_id=None)[0, prompt.shape[1]:]
    ours_ids = [t for (t,) in llm.generate_ids([prompt[0].tolist()], [SamplingParams(temperature=0.0)], 16, stop_at_eos=False)]
    assert ours_ids == theirs.tolist()


# ----------------------------------------------------------------------------------------------------
# LLM.from_transformers


def test_from_transformers_shares_weights_and_greedy_matches(hf_smollm):
    hf, tok = hf_smollm
    LLM.from_transformers(tiny("llama"))  # imports and first-use set-up outside the measurement
    before = rss_bytes()
    llm = LLM.from_transformers(hf, tok)
    grown = rss_bytes() - before
    assert grown < 50 * 2**20, f"wrapping grew RSS by {grown / 2**20:.1f} MiB"
    hf_ptrs = {p.data_ptr() for p in hf.parameters()}
    assert all(p.data_ptr() in hf_ptrs for p in llm.model.parameters())
    ids = tok("I love")["input_ids"]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=64)[0, len(ids):].tolist()
    assert llm.generate("I love", max_new_tokens=64).token_ids == theirs
    assert llm._session_supported()  # decoded on the C++ session


def test_from_transformers_without_tokenizer_takes_token_ids_and_refuses_text():
    model = tiny("llama", seed=3)
    llm = LLM.from_transformers(model)
    with pytest.raises(ValueError, match="tokenizer="):
        llm.generate("hello")
    with pytest.raises(ValueError, match="tokenizer="):   # text pieces: refused at the call
        llm.stream([5, 6, 7, 8])
    with torch.no_grad():
        theirs = model.generate(torch.tensor([[5, 6, 7, 8]]), do_sample=False, max_new_tokens=4)[0, 4:].tolist()
    got = llm.generate([5, 6, 7, 8], max_new_tokens=4)   # (its engine step used to ask the tokenizer for text)
    assert got.token_ids == theirs and got.text == ""


def test_from_transformers_rejects_other_classes():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LLM.from_transformers(gpt2)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        lf_hf.accelerate(gpt2)
    biased = tiny("llama", attention_bias=True)
    with pytest.raises(ValueError, match="biases"):
        LLM.from_transformers(biased)


# ----------------------------------------------------------------------------------------------------
# generate() and accelerate()


def test_generate_matches_model_generate_greedy(hf_smollm):
    hf, tok = hf_smollm
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        theirs = hf.generate(ids, do_sample=False, max_new_tokens=24)
    assert torch.equal(lf_hf.generate(hf, ids, do_sample=False, max_new_tokens=24), theirs)


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=20), dict(max_length=17)], ids=["max_new_tokens", "max_length"])
def test_generate_matches_on_left_padded_batches(kwargs):
    model = tiny("llama", seed=11)
    ids, mask = left_padded(random_prompts(101, [9, 4, 6], seed=12), 0)
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)
    assert torch.equal(lf_hf.generate(model, ids, attention_mask=mask, do_sample=False, **kwargs), theirs)


@pytest.mark.parametrize("length", [10, 25, 250])
def test_generate_without_a_length_makes_transformers_default_new_tokens(length):
    """No max_new_tokens nor max_length: transformers makes its default max_length (20) of new tokens, as far
    as the model's 256 positions allow (a 250-token prompt gets 6)."""
    model = tiny("llama", seed=13, eos_token_id=None)   # (every row runs its full length)
    ids = torch.tensor(random_prompts(101, [length], seed=14))
    with torch.no_grad():
        theirs = model.generate(ids, do_sample=False)
    assert theirs.shape[1] == min(length + 20, 256)
    assert torch.equal(lf_hf.generate(model, ids, do_sample=False), theirs)


def test_generate_repetition_penalty_matches_and_refuses_padding():
    model = tiny("llama", seed=17)
    ids = torch.tensor(random_prompts(101, [8, 8], seed=18))
    kwargs = dict(do_sample=False, max_new_tokens=24, repetition_penalty=1.5)
    with torch.no_grad():
        theirs = model.generate(ids, **kwargs)
        plain = model.generate(ids, do_sample=False, max_new_tokens=24)
    assert not torch.equal(theirs, plain)  # the penalty changes the greedy tokens here
    assert torch.equal(lf_hf.generate(model, ids, **kwargs), theirs)
    with pytest.raises(ValueError, match="repetition_penalty"):
        lf_hf.generate(model, ids, attention_mask=torch.tensor([[0] + [1] * 7, [1] * 8]), **kwargs)


def test_generate_stops_and_pads_rows_at_eos_as_transformers_does():
    model = tiny("llama", seed=11)
    ids, mask = left_padded(random_prompts(101, [9, 4, 6], seed=12), 0)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=30, pad_token_id=0)
    with torch.no_grad():
        free = model.generate(ids, eos_token_id=None, **kwargs)
        eos = int(free[1, ids.shape[1] + 3])  # a token row 1 writes early on
        theirs = model.generate(ids, eos_token_id=[eos, 2], **kwargs)
    ours = lf_hf.generate(model, ids, eos_token_id=[eos, 2], **kwargs)
    assert torch.equal(ours, theirs)
    assert torch.equal(lf_hf.generate(model, ids, eos_token_id=None, **kwargs), free)


def test_generate_samples_reproducibly_with_num_return_sequences():
    model = tiny("llama", seed=13)
    ids = torch.tensor(random_prompts(101, [5, 5], seed=14))
    kwargs = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, max_new_tokens=12,
                  num_return_sequences=3, eos_token_id=None)
    torch.manual_seed(0)
    first = lf_hf.generate(model, ids, **kwargs)
    torch.manual_seed(0)
    again = lf_hf.generate(model, ids, **kwargs)
    assert first.shape == (6, 17) and torch.equal(first, again)
    assert torch.equal(first[:, :5], ids.repeat_interleave(3, 0))
    assert len({tuple(r) for r in first[:3, 5:].tolist()}) > 1  # the rows of one prompt differ


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_beams=2), "num_beams"), (dict(typical_p=0.5), "typical_p"), (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size"),
    (dict(min_new_tokens=3), "min_new_tokens"), (dict(output_scores=True), "output_scores"),
    (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha"), (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens"),
    (dict(logits_processor=[]), "logits_processor"), (dict(stopping_criteria=[]), "stopping_criteria"),
    (dict(streamer=object()), "streamer"), (dict(bad_words_ids=[[5]]), "bad_words_ids"),
    (dict(num_return_sequences=2), "num_return_sequences"),
])
def test_generate_names_what_it_cannot_honour(kwargs, name):
    model = tiny("llama")
    with pytest.raises(ValueError, match=name):
        lf_hf.generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4, **kwargs)


def test_generate_rejects_bad_inputs():
    model = tiny("llama")
    with pytest.raises(ValueError, match="input_ids"):
        lf_hf.generate(model, torch.tensor([5, 6, 7]))
    with pytest.raises(ValueError, match="input_ids or inputs, not both"):
        lf_hf.generate(model, torch.tensor([[5]]), inputs=torch.tensor([[5]]))
    llm = LLM.from_transformers(model)
    for bad in ([[1, 2]], torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long)):
        with pytest.raises(ValueError, match="input_ids must be a non-empty integer tensor"):
            llm.logits(bad)
    with pytest.raises(ValueError, match="attention_mask"):  # right padding
        lf_hf.generate(model, torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask \(none was passed: it is input_ids != pad_token_id 0\)"):
        lf_hf.generate(model, torch.tensor([[5, 0, 6]]), max_new_tokens=2)   # a pad token inside the prompt
    with pytest.raises(ValueError, match="max_length"):
        lf_hf.generate(model, torch.tensor([[5] * 30]), max_length=20)


def test_accelerate_patches_generate():
    model = tiny("llama", seed=15)
    ids = torch.tensor(random_prompts(101, [7], seed=16))
    with torch.no_grad():
        theirs = model.generate(ids, do_sample=False, max_new_tokens=16)
    assert lf_hf.accelerate(model) is model
    assert torch.equal(model.generate(ids, do_sample=False, max_new_tokens=16), theirs)
    # A weight replaced, not changed in place (the shared tensors would not see it): decoded on the new one.
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    with torch.no_grad():
        theirs = transformers.LlamaForCausalLM.generate(model, ids, do_sample=False, max_new_tokens=16)
    assert torch.equal(model.generate(ids, do_sample=False, max_new_tokens=16), theirs)
    assert torch.equal(model.generate(inputs=ids, do_sample=False, max_new_tokens=16), theirs)   # (its first name)


def test_a_tied_lm_head_replaced_is_untied():
    """tie_word_embeddings says tied, but lm_head was given a Parameter of its own: that one is the output."""
    model = tiny("llama", seed=17, tie_word_embeddings=True)
    ids = torch.tensor(random_prompts(101, [7], seed=18))
    lf_hf.accelerate(model)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    with torch.no_grad():
        theirs = transformers.LlamaForCausalLM.generate(model, ids, do_sample=False, max_new_tokens=12)
        torch.testing.assert_close(LLM.from_transformers(model).logits(ids), model(ids).logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(model.generate(ids, do_sample=False, max_new_tokens=12), theirs)


def test_a_generation_config_passed_takes_the_models_for_what_it_leaves_unset():
    """As transformers: GenerationConfig(max_new_tokens=15) says nothing of eos, so the model's eos stops."""
    model = tiny("llama", seed=11)
    ids = torch.tensor(random_prompts(101, [9], seed=12))
    with torch.no_grad():
        free = model.generate(ids, do_sample=False, max_new_tokens=15, eos_token_id=None)
    model.generation_config.eos_token_id = int(free[0, 9 + 3])   # the 4th token the greedy row writes
    passed = transformers.GenerationConfig(max_new_tokens=15, do_sample=False)
    with torch.no_grad():
        theirs = model.generate(ids, generation_config=passed)
    assert theirs.shape[1] < 9 + 15 and torch.equal(lf_hf.generate(model, ids, generation_config=passed), theirs)
