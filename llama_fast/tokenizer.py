"""Tokenizers for LLaMA-family checkpoints, chat templates and streaming detokenization.

Two kinds are supported:
- "bpe": byte-level BPE (GGUF ``tokenizer.ggml.model == "gpt2"``, or a Hugging Face ``tokenizer.json``),
  run by the ``tokenizers`` library;
- "sentencepiece": a SentencePiece ``tokenizer.model`` (HF or Meta directory), or a GGUF ``"llama"``
  vocabulary rebuilt into a SentencePiece model, run by ``sentencepiece``.

A GGUF "gpt2" vocabulary is pre-tokenized as llama.cpp does for its ``tokenizer.ggml.pre`` (the regexes
of llama.cpp's llama-vocab.cpp; tests check llama.cpp's own test vectors), and an unknown name raises.

Control tokens written in the text, such as ``<|im_start|>``, are encoded as their ids unless
``encode(..., parse_special=False)``; chat templates tokenize message content that way, so text in a message
never becomes a control token.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers

from . import validate

# GGUF token types; SentencePiece uses the same numbers for its piece types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn in the chat templates of common LLaMA-family models.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

# llama.cpp's BPE pre-tokenizers (its llama-vocab.cpp, llm_tokenizer_bpe): regexes applied in turn, each
# splitting the pieces the one before left (what a regex matches and the text between matches both become
# pieces), then byte-level BPE on each piece.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
_QWEN35_REGEX = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Qwen2's, with combining marks kept in words
_CJK_RUNS = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
# DeepSeek LLM's letters: the cased letters of Unicode, as llama.cpp lists them.
_DEEPSEEK_LETTERS = (
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376"
    "\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
    "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+")


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback pieces


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): the character that stands for each byte in its tokens -> the byte.
    Printable bytes stand for themselves; the others, in order, for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_LEVEL = _byte_level_alphabet()


@dataclass(frozen=True)
class _PreTokenizer:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is a whole token is that token (BPE merges not applied)
    add_bos: bool = False  # BOS is added unless the GGUF says otherwise (tokenizer.ggml.add_bos_token)


_LLAMA3 = _PreTokenizer((_LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
_GPT2 = _PreTokenizer((_GPT2_REGEX,))
_DIGITS_THEN_GPT2 = _PreTokenizer((r"\p{N}", _GPT2_REGEX))  # every digit is its own piece
_QWEN2 = _PreTokenizer((_QWEN2_REGEX,))
# tokenizer.ggml.pre -> pre-tokenizer, for the names llama.cpp gives vocabularies of LLaMA-family models
# that need nothing but a pre-tokenizer (others, e.g. BERT-style separators, raise as unknown).
BPE_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", "[0-9][0-9][0-9]")),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                    _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _PreTokenizer((_LLAMA3_REGEX,))),
    "deepseek-llm": _PreTokenizer(("[\r\n]", _DEEPSEEK_LETTERS,
                                   "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
                                   r"\s+$", _CJK_RUNS, r"\p{N}+")),
    "deepseek-coder": _PreTokenizer(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_RUNS, r"\p{N}")),
    "falcon": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_REGEX, "[0-9][0-9][0-9]")),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
                     "mellum2"), _DIGITS_THEN_GPT2),
    **dict.fromkeys(("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4",
                     "mellum", "gigachat", "a.x-4.0"), _GPT2),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
                     "solar-open"), _QWEN2),
    "qwen35": _PreTokenizer((_QWEN35_REGEX,)),
}


class TokenizerError(ValueError):
    """A tokenizer file or metadata is missing, corrupt or unsupported; the message names which."""


_ITEM_TYPES = {"strings": str, "ints": int, "numbers": (int, float)}


def _gguf_array(meta: dict, key: str, name: str, items: str, length: int | None = None) -> list | None:
    """GGUF metadata array `key` (None when absent) checked to be a list of `items` ("strings", "ints" or
    "numbers"; bool is neither) with `length` entries when given (one a token each: zip would cut the vocabulary
    short). The tokenizers library panics on other values, killing the process."""
    value = meta.get(key)
    if value is None:
        return None
    kind = _ITEM_TYPES[items]
    if not isinstance(value, list):
        got = f"a {type(value).__name__}"
    elif length is not None and len(value) != length:
        got = f"{len(value)} entries"
    else:
        odd = [v for v in value if not isinstance(v, kind) or isinstance(v, bool)]
        if not odd:
            return value
        got = f"the entry {odd[0]!r}"
    count = "" if length is None else f"{length} "
    raise TokenizerError(f"{name}: {key} must be an array of {count}{items}, got {got}")


def _bpe_pre_tokenizer(pre: str | None, name: str) -> _PreTokenizer:
    """The pre-tokenizer of a GGUF "gpt2" vocabulary's ``tokenizer.ggml.pre`` (llama.cpp's "default"
    when the key is missing, with its warning)."""
    if not pre:
        warnings.warn(f"{name}: no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer "
                      "(generation quality may suffer: reconvert the model)", stacklevel=3)
        pre = "default"
    if pre not in BPE_PRE_TOKENIZERS:
        raise TokenizerError(f"{name}: unknown tokenizer.ggml.pre {pre!r} (supported: "
                             f"{', '.join(sorted(BPE_PRE_TOKENIZERS))})")
    return BPE_PRE_TOKENIZERS[pre]


@dataclass(frozen=True)
class _Special:
    """A control token as text: its id and whether whitespace next to it is absorbed (tokenizer.json's
    lstrip/rstrip)."""
    id: int
    lstrip: bool = False
    rstrip: bool = False


class _HFBackend:
    """A ``tokenizers.Tokenizer`` (byte-level BPE, or any tokenizer.json). Its special added tokens are the
    control tokens; its other added tokens (llama.cpp's "user-defined") are matched in any text."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self._plain = None  # a copy that leaves control-token text as text, built when first needed
        self.special = {t.content: _Special(i, t.lstrip, t.rstrip)
                        for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.special_re = _special_regex(self.special)

    def encode(self, text: str, parse_special: bool) -> list[int]:
        if parse_special:
            return self.tok.encode(text, add_special_tokens=False).ids
        if self._plain is None:
            self._plain = tokenizers.Tokenizer.from_str(self.tok.to_str())
            self._plain.encode_special_tokens = True
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)


class _SPBackend:
    """A ``sentencepiece`` model. Control pieces written in the text are split off and encoded as their
    ids when parse_special, and the text between them is encoded on its own (HF's legacy behaviour, and
    llama.cpp's); user-defined pieces are matched by sentencepiece itself in any text."""

    def __init__(self, sp):
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        self.special = {sp.id_to_piece(i): _Special(i) for i in range(self.vocab_size) if sp.is_control(i)}
        self.special_re = _special_regex(self.special)

    def encode(self, text: str, parse_special: bool) -> list[int]:
        if not parse_special:
            return self.sp.encode(text)
        return _encode_around_specials([(text, True)], self, self.sp.encode)

    def decode(self, ids: list[int], skip_special: bool) -> str:
        out, run = [], []
        for i in ids:
            if self.sp.is_control(i):
                out.append(self.sp.decode(run))
                run = []
                if not skip_special:
                    out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.vocab_size else None


def _absorb_whitespace_after_specials(backend: _SPBackend) -> None:
    """Phi-3's control tokens absorb the whitespace after them (its tokenizer.json's rstrip), but <unk>, <s>
    and <|endoftext|>: llama.cpp sets this for a GGUF whose general.name says Phi-3, whose metadata cannot."""
    keep = ("<unk>", "<s>", "<|endoftext|>")
    backend.special = {text: special if text in keep else dataclasses.replace(special, rstrip=True)
                       for text, special in backend.special.items()}


def _special_regex(special: dict[str, _Special]) -> re.Pattern | None:
    """A regex matching these control tokens, longest first (None when there are none)."""
    names = sorted(special, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, names))) if names else None


def _encode_around_specials(pieces: list[tuple[str, bool]], backend, encode_text) -> list[int]:
    """Ids of the concatenated ``pieces`` ((text, may hold control tokens)): control-token text is taken
    as the token only inside pieces that may hold them; everything between the control tokens found is
    encoded as one plain text by ``encode_text``, so text is split only where a control token is."""
    ids: list[int] = []
    pending = ""  # plain text since the last control token
    strip_next = False  # the last control token absorbs the whitespace after it

    def add_text(text: str):
        nonlocal pending, strip_next
        if strip_next:
            text = text.lstrip()
            strip_next = strip_next and not text
        pending += text

    for text, specials_allowed in pieces:
        pos = 0
        matches = backend.special_re.finditer(text) if specials_allowed and backend.special_re else ()
        for match in matches:
            special = backend.special[match.group()]
            add_text(text[pos:match.start()])
            if special.lstrip:
                pending = pending.rstrip()
            if pending:
                ids.extend(encode_text(pending))
            pending = ""
            ids.append(special.id)
            strip_next = special.rstrip
            pos = match.end()
        add_text(text[pos:])
    if pending:
        ids.extend(encode_text(pending))
    return ids


def _load_sentencepiece(source: str | bytes, name: str) -> _SPBackend:
    """A SentencePiece backend from a tokenizer.model path or a serialized ModelProto."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        if isinstance(source, bytes):
            sp.load_from_serialized_proto(source)
        else:
            sp.load(source)
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{name}: not a valid SentencePiece model ({e})") from None
    return _SPBackend(sp)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """Jinja's ``tojson`` as Hugging Face defines it for chat templates (no HTML escaping)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _generation_tag():
    """transformers' ``{% generation %}...{% endgeneration %}`` (it marks an assistant's reply for training
    masks): rendered as its body."""
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    return Generation


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _read_json(path: Path) -> dict:
    """A JSON file as a dict ({} when the file does not exist)."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: corrupt JSON ({e})") from None


def _token_str(value) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or
    a dict with "content"."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_pieces(text: str, messages: list[dict], render) -> list[tuple[str, bool]]:
    """The rendered chat ``text`` cut into (piece, is template markup): message contents are found by
    rendering again with a unique placeholder as each content, which shows the markup around them. A
    template may write a content as is or trimmed (both ends or one: Llama 2's strips the system prompt and
    the first message together); of those, the one the next markup follows is taken. A template that
    changes a content otherwise (or branches on it) cannot be traced and raises."""
    marker = f"\x00{secrets.token_hex(8)}:"
    skeleton = render([{**m, "content": f"{marker}{n}\x00"} for n, m in enumerate(messages)])
    parts = re.split(re.escape(marker) + "(\\d+)\x00", skeleton)  # markup, index, markup, ..., markup
    pieces, pos = [], 0
    for k in range(0, len(parts), 2):
        markup = parts[k]
        if not text.startswith(markup, pos):
            break
        pieces.append((markup, True))
        pos += len(markup)
        if k + 1 == len(parts):
            if pos == len(text):
                return pieces
            break
        content, after = messages[int(parts[k + 1])]["content"], parts[k + 2]
        found = next((c for c in (content, content.strip(), content.rstrip(), content.lstrip())
                      if text.startswith(c, pos) and text.startswith(after, pos + len(c))), None)
        if found is None:
            break
        pieces.append((found, False))
        pos += len(found)
    raise TokenizerError("the chat template changes message content beyond trimming it, so its markup "
                         "cannot be told from the content: use tokenize=False, or "
                         "allow_special_in_content=True to parse control tokens everywhere")


class Tokenizer:
    """Text <-> token ids for one checkpoint, with its BOS/EOS conventions and chat template."""

    def __init__(self, backend, *, kind: str, bos_id: int | None, eos_id: int | None,
                 add_bos: bool, chat_template: str | None = None, extra_eos_ids: Iterable[int] = (),
                 template_ids: dict[str, int | None] | None = None):
        """template_ids: the ids of the other special tokens a chat template may write, by their variable
        names (pad_token, unk_token), as transformers passes them."""
        self._backend = backend
        self.kind = kind
        self.vocab_size = backend.vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        self.eos_ids = {i for i in (eos_id, *extra_eos_ids) if i is not None}
        self._bytes: dict[int, bytes] = {}   # token_bytes' answers: the server asks per token, twice with logprobs
        self._template_tokens = {name: self.token(i) for name, i in (template_ids or {}).items()
                                 if isinstance(i, int) and not isinstance(i, bool)}
        for token in END_OF_TURN_TOKENS:  # the turn ends the chat template writes also end generation
            i = backend.token_to_id(token)
            if i is not None and chat_template and token in chat_template:
                self.eos_ids.add(i)

    def __repr__(self) -> str:
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={sorted(self.eos_ids)}, add_bos={self.add_bos})")

    def token(self, i: int | None) -> str | None:
        """The text of token ``i`` as the vocabulary writes it (None for None or an unknown id)."""
        return None if i is None else self._backend.id_to_token(i)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token ``i`` adds to a text. A byte-level BPE token or a SentencePiece byte piece may hold
        part of a character, which decode([i]) can only show as U+FFFD; SentencePiece's "\u2581" is a space
        (decode([i]) drops it at the start of a text)."""
        known = self._bytes.get(i)
        if known is None:
            known = self._bytes[i] = self._read_token_bytes(i)
        return known

    def _read_token_bytes(self, i: int) -> bytes:
        text = self.decode([i])
        piece = self.token(i)
        if piece is None or piece in self._backend.special:
            return text.encode()
        if self.kind == "sentencepiece":
            byte = _BYTE_PIECE.fullmatch(piece)
            return bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode()
        if "\ufffd" in text and all(c in _BYTE_LEVEL for c in piece):
            return bytes(_BYTE_LEVEL[c] for c in piece)
        return text.encode()

    def check_ids(self, ids) -> list[int]:
        """``ids`` (any iterable of ints, e.g. a 1-D tensor) as a list, each checked to be in the vocabulary."""
        out = []
        for i in ids:
            if isinstance(i, bool) or not hasattr(i, "__index__"):
                raise TypeError(f"token ids must be ints, got {i!r} ({type(i).__name__})")
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (ids 0..{self.vocab_size - 1})")
            out.append(i)
        return out

    def encode(self, text: str, *, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``. BOS is prepended when ``add_bos`` (default: the checkpoint's setting, as
        transformers' add_special_tokens=True) says so and the text does not already start with it (e.g. a
        chat template wrote it). ``parse_special``: control-token text such as "<|im_start|>" becomes that
        token; with False it is tokenized as plain text (user-defined tokens are still matched, as in
        llama.cpp and transformers)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        validate.text(text, "text")
        return self._with_bos(self._backend.encode(text, parse_special), add_bos)

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids, *, skip_special: bool = False) -> str:
        """The text of ``ids`` (any iterable of ints, e.g. a 1-D tensor); special tokens are written out
        unless ``skip_special``. An id outside the vocabulary raises naming it."""
        return self._backend.decode(self.check_ids(ids), skip_special)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            tokenize: bool = False, allow_special_in_content: bool = False,
                            **extra) -> str | list[int]:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the checkpoint's jinja2 chat
        template the way Hugging Face does; ``extra`` becomes template variables.

        tokenize=False returns the text. tokenize=True returns the ids: the template's markup with its
        control tokens, and each message's content as plain text (encode's parse_special=False), so text
        such as "<|im_end|>" inside a message never becomes a control token and a user cannot forge a turn;
        ``allow_special_in_content=True`` parses control tokens in content too. BOS is prepended as
        ``encode`` does (when the checkpoint adds one and the template did not write it)."""
        validate.messages(messages)
        if not self.chat_template:
            raise TokenizerError("this checkpoint has no chat template; encode a plain prompt instead")
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # (lazily: 40 ms of every cold start)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                           extensions=["jinja2.ext.loopcontrols", _generation_tag()])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        tokens = {"bos_token": self.token(self.bos_id), "eos_token": self.token(self.eos_id), **self._template_tokens}
        variables = {k: v for k, v in tokens.items() if v is not None}
        variables.update(extra)
        template = env.from_string(self.chat_template)

        def render(msgs):
            return template.render(messages=msgs, add_generation_prompt=add_generation_prompt, **variables)

        text = render(messages)
        if not tokenize:
            return text
        if allow_special_in_content:
            return self.encode(text, add_bos=None, parse_special=True)
        pieces = _chat_pieces(text, messages, render)
        ids = _encode_around_specials(pieces, self._backend, lambda t: self._backend.encode(t, False))
        return self._with_bos(ids, None)

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike) -> "Tokenizer":
        """The tokenizer of a checkpoint: a built-in model name (e.g. "smollm2-135m-instruct"), a .gguf file
        (a vocab-only GGUF too), or a Hugging Face or Meta directory. Loads no weights (nor torch)."""
        from .paths import resolve_model_path

        if not isinstance(path_or_name, (str, os.PathLike)):
            raise TypeError(f"path_or_name must be a str or path, got {type(path_or_name).__name__}")
        path = resolve_model_path(os.fspath(path_or_name))
        if os.path.isdir(path):
            return cls.from_dir(path)
        from .gguf_file import GGUFFile
        from .paths import CheckpointError

        try:
            meta = GGUFFile(path).metadata
        except CheckpointError as err:
            raise TokenizerError(str(err)) from None
        return cls.from_gguf_metadata(meta, path)

    @classmethod
    def from_gguf_metadata(cls, meta: dict, path: str = "") -> "Tokenizer":
        """A tokenizer from GGUF metadata (key -> python value, arrays as lists); ``path`` names the file
        in errors."""
        name = path or "GGUF metadata"
        model = meta.get("tokenizer.ggml.model")
        if model not in ("gpt2", "llama"):
            raise TokenizerError(f"{name}: unsupported tokenizer.ggml.model {model!r} "
                                 "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")
        tokens = _gguf_array(meta, "tokenizer.ggml.tokens", name, "strings")
        if not tokens:
            raise TokenizerError(f"{name}: no tokenizer.ggml.tokens")
        types = _gguf_array(meta, "tokenizer.ggml.token_type", name, "ints", len(tokens)) or [NORMAL] * len(tokens)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        if model == "gpt2":
            pre = _bpe_pre_tokenizer(meta.get("tokenizer.ggml.pre"), name)
            backend, kind = cls._gguf_bpe(meta, tokens, types, pre, name), "bpe"
            add_bos_default = pre.add_bos
        else:
            backend, kind = cls._gguf_sentencepiece(meta, tokens, types, name), "sentencepiece"
            add_bos_default = True
            if any(phi3 in str(meta.get("general.name", "")).lower() for phi3 in ("phi-3", "phi3")):
                _absorb_whitespace_after_specials(backend)
        extra_eos = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        template = meta.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{name}: tokenizer.chat_template must be a string, got {template!r}")
        return cls(backend, kind=kind, bos_id=bos, eos_id=eos,
                   add_bos=meta.get("tokenizer.ggml.add_bos_token", add_bos_default),
                   chat_template=template, extra_eos_ids=extra_eos,
                   template_ids={"pad_token": meta.get("tokenizer.ggml.padding_token_id"),
                                 "unk_token": meta.get("tokenizer.ggml.unknown_token_id")})

    @staticmethod
    def _gguf_bpe(meta: dict, tokens: list[str], types: list[int], pre: _PreTokenizer, name: str) -> _HFBackend:
        """Byte-level BPE from a GGUF "gpt2" vocabulary: tokens, merges and llama.cpp's pre-tokenizer."""
        merges = _gguf_array(meta, "tokenizer.ggml.merges", name, "strings")
        if not merges:
            raise TokenizerError(f"{name}: tokenizer.ggml.model is 'gpt2' but there are no tokenizer.ggml.merges")
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        # The tokenizers library panics, killing the process, on a merge whose result is not a token (a merge of
        # tokens not in the vocabulary it refuses as the exception below).
        bad = next((m for m, pair in zip(merges, pairs) if len(pair) != 2 or "".join(pair) not in vocab), None)
        if bad is not None:
            raise TokenizerError(f"{name}: tokenizer.ggml.merges holds {bad!r}, not two space-separated pieces "
                                 "whose join is a token")
        try:
            bpe = tokenizers.models.BPE(vocab, pairs, ignore_merges=pre.ignore_merges)
        except Exception as e:
            raise TokenizerError(f"{name}: inconsistent BPE vocabulary/merges ({e})") from None
        tok = tokenizers.Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated") for r in pre.regexes]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == CONTROL])
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == USER_DEFINED])
        return _HFBackend(tok)

    @staticmethod
    def _gguf_sentencepiece(meta: dict, tokens: list[str], types: list[int], name: str) -> _SPBackend:
        """A SentencePiece BPE model (what llama.cpp's "llama" vocabulary is) rebuilt from tokens, scores
        and token types."""
        from sentencepiece import sentencepiece_model_pb2 as pb

        scores = _gguf_array(meta, "tokenizer.ggml.scores", name, "numbers", len(tokens)) or [0.0] * len(tokens)
        unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
        proto = pb.ModelProto()
        for i, (piece, score, ty) in enumerate(zip(tokens, scores, types)):
            # SentencePiece allows one unknown piece; llama.cpp treats the others (Phi-3's added tokens)
            # as control tokens: never produced from plain text, matched when parsing special tokens.
            ty = UNKNOWN if i == unk else CONTROL if ty == UNKNOWN else ty
            proto.pieces.add(piece=piece, score=score, type=ty)
        spec = proto.trainer_spec
        spec.model_type = pb.TrainerSpec.BPE
        spec.vocab_size = len(tokens)
        spec.byte_fallback = BYTE in types
        spec.unk_id = unk
        for field, key in (("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "padding")):
            setattr(spec, field, meta.get(f"tokenizer.ggml.{key}_token_id", -1))
        norm = proto.normalizer_spec
        norm.name = "identity"
        norm.add_dummy_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        norm.remove_extra_whitespaces = False
        norm.escape_whitespaces = True
        return _load_sentencepiece(proto.SerializeToString(), name)

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        """A tokenizer from a Hugging Face directory (tokenizer.json, else tokenizer.model, with
        tokenizer_config.json, special_tokens_map.json, generation_config.json, chat_template.jinja
        when present) or a Meta directory (tokenizer.model: BOS added, EOS from the model)."""
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"{path}: tokenizer directory not found")
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        generation = _read_json(path / "generation_config.json")
        if (path / "tokenizer.json").is_file():
            try:
                tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:
                raise TokenizerError(f"{path / 'tokenizer.json'}: cannot be read ({e})") from None
            backend = _HFBackend(tok)
            kind = "bpe" if isinstance(tok.decoder, decoders.ByteLevel) else "sentencepiece"  # Metaspace-style
        elif (path / "tokenizer.model").is_file():
            model_file = str(path / "tokenizer.model")
            backend, kind = _load_sentencepiece(model_file, model_file), "sentencepiece"
        else:
            raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model")

        def special_id(name: str) -> int | None:
            token = _token_str(config.get(name) or special_map.get(name))
            return backend.token_to_id(token) if token else None

        bos, eos = special_id("bos_token"), special_id("eos_token")
        if isinstance(backend, _SPBackend):  # a bare tokenizer.model (Meta) names them itself
            sp = backend.sp
            bos = bos if bos is not None or sp.bos_id() < 0 else sp.bos_id()
            eos = eos if eos is not None or sp.eos_id() < 0 else sp.eos_id()
        gen_eos = generation.get("eos_token_id", [])
        gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        bos = bos if bos is not None else generation.get("bos_token_id")
        eos = eos if eos is not None else (gen_eos[0] if gen_eos else None)
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        elif isinstance(backend, _HFBackend):  # does tokenizer.json's post-processor prepend BOS?
            add_bos = bos is not None and backend.tok.encode("a").ids[:1] == [bos]
        else:
            add_bos = True  # SentencePiece LLaMA checkpoints (HF and Meta) prepend BOS
        return cls(backend, kind=kind, bos_id=bos, eos_id=eos, add_bos=add_bos,
                   chat_template=cls._dir_chat_template(path, config), extra_eos_ids=gen_eos,
                   template_ids={"pad_token": special_id("pad_token"), "unk_token": special_id("unk_token")})

    @staticmethod
    def _dir_chat_template(path: Path, config: dict) -> str | None:
        """The chat template of an HF directory: chat_template.jinja, chat_template.json or
        tokenizer_config.json (a string, or a list of named templates of which "default" is used)."""
        if (path / "chat_template.jinja").is_file():
            return (path / "chat_template.jinja").read_text(encoding="utf-8")
        template = _read_json(path / "chat_template.json").get("chat_template") or config.get("chat_template")
        if isinstance(template, list):
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        return template


class StreamDecoder:
    """Incremental detokenizer: feed generated ids one at a time, get the text that is safe to print.

    Text is only released once it no longer ends in an incomplete UTF-8 sequence (U+FFFD), and each
    new piece is the difference between decoding a short window of ids with and without the newest
    ones, so SentencePiece's leading-space handling sees its context."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, *,
                 skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids = [int(i) for i in (prompt_ids or [])][-1:]  # the last prompt token is context enough
        self.prefix = 0  # ids[prefix:read] is the window of ids already turned into text
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)

    def push(self, token_id: int) -> str:
        """Add one id; return the new text that is now complete ("" if it must wait)."""
        self.ids.append(int(token_id))
        old = self._decode(self.ids[self.prefix:self.read])
        new = self._decode(self.ids[self.prefix:])
        if len(new) <= len(old) or new.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return new[len(old):]

    def flush(self) -> str:
        """The text still held back (e.g. an incomplete character at the very end)."""
        old = self._decode(self.ids[self.prefix:self.read])
        new = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return new[len(old):]


def check_context(length: int, context: int | None) -> None:
    """Refuses an input longer than the model's context (None: no bound, as under a sliding window)."""
    if context is not None and length > context:
        raise ValueError(f"the input has {length} tokens; the model's context is {context} tokens")


def encode_prompt(tokenizer: Tokenizer, prompt: str | list[int], context: int | None) -> list[int]:
    """The prompt's token ids (a text encoded, or token ids checked): at least one, and no more than
    `context` (see check_context)."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else tokenizer.check_ids(prompt)
    if not ids:
        raise ValueError("a prompt must contain at least one token")
    check_context(len(ids), context)
    return ids


def stop_strings(stop: str | list[str] | None) -> list[str]:
    """generate's `stop` argument as a list, checked."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise ValueError("stop strings must be non-empty")
    return stops


class TextStream:
    """One row's generated text as its tokens arrive: decoded incrementally (StreamDecoder), stop strings
    cut from it, and text that might begin a stop string held back until it cannot."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stops: list[str]):
        self.decoder = StreamDecoder(tokenizer, prompt_ids)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""  # decoded text not yet released (may hold a stop string's prefix)

    def push(self, token: int) -> tuple[str, str | None]:
        """-> (the text now safe to release, the stop string that ended the row or None: the text stops
        before it)."""
        self.pending += self.decoder.push(token)
        return self._release(self.hold)

    def flush(self) -> tuple[str, str | None]:
        """The row has ended (an end-of-sequence token, its length): push's answer for everything still held
        back, a partial character included. That may hold a stop string yet (the decoder held back a piece
        while it ended inside a character), which then ends the row instead."""
        self.pending += self.decoder.flush()
        return self._release(0)

    def _release(self, hold: int) -> tuple[str, str | None]:
        found = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if found:
            cut, stop = min(found)
            text, self.pending = self.pending[:cut], ""
            return text, stop
        safe = max(len(self.pending) - hold, 0)
        text, self.pending = self.pending[:safe], self.pending[safe:]
        return text, None


def stream_text(tokenizer: Tokenizer, prompt_ids: list[list[int]], steps: Iterable[list[int | None]],
                stops: list[str], eos_ids: set[int]) -> Iterator[tuple[int, str, int | None, str | None]]:
    """Turns a decode loop's steps (one new token per row, None for rows already done) into
    (row, new text, new token id or None, finish reason or None) as rows produce text (a TextStream each);
    each row's last event carries its finish reason ("eos", "stop" or "length")."""
    streams = [TextStream(tokenizer, ids, stops) for ids in prompt_ids]
    finished = [False] * len(prompt_ids)
    for new_tokens in steps:
        for row, token in enumerate(new_tokens):
            if token is None or finished[row]:
                continue
            if token in eos_ids:
                finished[row] = True
                text, stop = streams[row].flush()
                yield row, text, token, "stop" if stop else "eos"
                continue
            text, stop = streams[row].push(token)
            finished[row] = stop is not None
            yield row, text, token, "stop" if finished[row] else None
        if all(finished):
            return
    for row in range(len(prompt_ids)):
        if not finished[row]:
            text, stop = streams[row].flush()
            yield row, text, None, "stop" if stop else "length"

