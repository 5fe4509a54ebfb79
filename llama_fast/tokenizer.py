"""Tokenizers for LLaMA-family checkpoints, chat templates and streaming detokenization.

Two kinds are supported:
- "bpe": byte-level BPE (GGUF ``tokenizer.ggml.model == "gpt2"``, or a Hugging Face ``tokenizer.json``),
  run by the ``tokenizers`` library;
- "sentencepiece": a SentencePiece ``tokenizer.model`` (HF or Meta directory), or a GGUF ``"llama"``
  vocabulary rebuilt into a SentencePiece model, run by ``sentencepiece``.

Special (control) tokens written in the text, such as ``<|im_start|>``, are encoded as their ids.
"""
from __future__ import annotations

import json
import re
import warnings
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

import tokenizers
from tokenizers import AddedToken, decoders, pre_tokenizers

# GGUF token types; SentencePiece uses the same numbers for its piece types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end a turn in the chat templates of common LLaMA-family models.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class TokenizerError(ValueError):
    """A tokenizer file or metadata is missing, corrupt or unsupported; the message names which."""


def _byte_level_pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """The pre-tokenizer for a GGUF ``tokenizer.ggml.pre`` name, and whether BPE should ignore merges
    for words already in the vocabulary (as llama.cpp does for Llama 3)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    def split(regex: str) -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated"), byte_level])

    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return split(_LLAMA3_REGEX), True
    if pre == "qwen2":
        return split(_QWEN2_REGEX), False
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):  # every digit is its own pre-token, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2]), False
    if pre not in ("default", "gpt2", ""):
        warnings.warn(f"unknown tokenizer.ggml.pre {pre!r}: using GPT-2's pre-tokenizer", stacklevel=3)
    return gpt2, False


class _HFBackend:
    """A ``tokenizers.Tokenizer`` (byte-level BPE, or any tokenizer.json)."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)


class _SPBackend:
    """A ``sentencepiece`` model; control pieces written in the text are split off and encoded as their
    ids, and the text between them is encoded on its own (HF's legacy behaviour, and llama.cpp's)."""

    def __init__(self, sp):
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        self.special = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        names = sorted(self.special, key=len, reverse=True)
        self.special_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def encode(self, text: str) -> list[int]:
        if self.special_re is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(self.special_re.split(text)):
            if i % 2:
                ids.append(self.special[part])
            elif part:
                ids += self.sp.encode(part)
        return ids

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


def _tojson(value, indent=None, separators=None, sort_keys=False):
    """Jinja's ``tojson`` as Hugging Face defines it for chat templates (no HTML escaping)."""
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


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


class Tokenizer:
    """Text <-> token ids for one checkpoint, with its BOS/EOS conventions and chat template."""

    def __init__(self, backend, *, kind: str, bos_id: int | None, eos_id: int | None,
                 add_bos: bool, chat_template: str | None = None, extra_eos_ids: Iterable[int] = ()):
        self._backend = backend
        self.kind = kind
        self.vocab_size = backend.vocab_size
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        self.eos_ids = {i for i in (eos_id, *extra_eos_ids) if i is not None}
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

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``. BOS is prepended when ``add_bos`` (default: the checkpoint's setting)
        says so and the text does not already start with it (e.g. a chat template wrote it)."""
        ids = self._backend.encode(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids, *, skip_special: bool = False) -> str:
        """The text of ``ids`` (any iterable of ints, e.g. a 1-D tensor); special tokens are written out
        unless ``skip_special``."""
        return self._backend.decode([int(i) for i in ids], skip_special)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            **extra) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the checkpoint's jinja2 chat
        template the way Hugging Face does; ``extra`` becomes template variables."""
        if not self.chat_template:
            raise TokenizerError("this checkpoint has no chat template; encode a plain prompt instead")
        from jinja2.sandbox import ImmutableSandboxedEnvironment  # (lazily: 40 ms of every cold start)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                           extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        tokens = {"bos_token": self.token(self.bos_id), "eos_token": self.token(self.eos_id)}
        variables = {k: v for k, v in tokens.items() if v is not None}
        variables.update(extra)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables)

    @classmethod
    def from_gguf_metadata(cls, meta: dict, path: str = "") -> "Tokenizer":
        """A tokenizer from GGUF metadata (key -> python value, arrays as lists); ``path`` names the file
        in errors."""
        name = path or "GGUF metadata"
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if model not in ("gpt2", "llama"):
            raise TokenizerError(f"{name}: unsupported tokenizer.ggml.model {model!r} "
                                 "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")
        if not tokens:
            raise TokenizerError(f"{name}: no tokenizer.ggml.tokens")
        types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        if model == "gpt2":
            backend, kind = cls._gguf_bpe(meta, tokens, types, name), "bpe"
            add_bos_default = False
        else:
            backend, kind = cls._gguf_sentencepiece(meta, tokens, types, name), "sentencepiece"
            add_bos_default = True
        extra_eos = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(backend, kind=kind, bos_id=bos, eos_id=eos,
                   add_bos=meta.get("tokenizer.ggml.add_bos_token", add_bos_default),
                   chat_template=meta.get("tokenizer.chat_template"), extra_eos_ids=extra_eos)

    @staticmethod
    def _gguf_bpe(meta: dict, tokens: list[str], types: list[int], name: str) -> _HFBackend:
        """Byte-level BPE from a GGUF "gpt2" vocabulary: tokens, merges and the named pre-tokenizer."""
        merges = meta.get("tokenizer.ggml.merges")
        if not merges:
            raise TokenizerError(f"{name}: tokenizer.ggml.model is 'gpt2' but there are no tokenizer.ggml.merges")
        pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
        try:
            bpe = tokenizers.models.BPE({t: i for i, t in enumerate(tokens)},
                                        [tuple(m.split(" ", 1)) for m in merges], ignore_merges=ignore_merges)
        except Exception as e:
            raise TokenizerError(f"{name}: inconsistent BPE vocabulary/merges ({e})") from None
        tok = tokenizers.Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizer
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

        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
        proto = pb.ModelProto()
        for i, (piece, score, ty) in enumerate(zip(tokens, scores, types)):
            proto.pieces.add(piece=piece, score=score, type=UNKNOWN if i == unk else ty)
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
                   chat_template=cls._dir_chat_template(path, config), extra_eos_ids=gen_eos)

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


def encode_prompt(tokenizer: Tokenizer, prompt: str, context: int | None) -> list[int]:
    """The prompt's token ids: at least one, and no more than `context` (see check_context)."""
    ids = tokenizer.encode(prompt)
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


def stream_text(tokenizer: Tokenizer, prompt_ids: list[list[int]], steps: Iterable[list[int | None]],
                stops: list[str], eos_ids: set[int]) -> Iterator[tuple[int, str, int | None, str | None]]:
    """Turns a decode loop's steps (one new token per row, None for rows already done) into
    (row, new text, new token id or None, finish reason or None) as rows produce text; each row's last
    event carries its finish reason ("eos", "stop" or "length").

    Stop strings end a row and are cut from its text; text that might begin a stop string is held back
    until it cannot.
    """
    decoders = [StreamDecoder(tokenizer, ids) for ids in prompt_ids]
    pending = [""] * len(prompt_ids)  # decoded text not yet yielded (may hold a stop string's prefix)
    finished = [False] * len(prompt_ids)
    hold = max((len(s) for s in stops), default=1) - 1
    for new_tokens in steps:
        for row, token in enumerate(new_tokens):
            if token is None or finished[row]:
                continue
            if token in eos_ids:
                finished[row] = True
                yield row, pending[row] + decoders[row].flush(), token, "eos"
                continue
            pending[row] += decoders[row].push(token)
            cut = min((pending[row].find(s) for s in stops if s in pending[row]), default=-1)
            if cut >= 0:
                finished[row] = True
                yield row, pending[row][:cut], token, "stop"
                continue
            safe = max(len(pending[row]) - hold, 0)
            yield row, pending[row][:safe], token, None
            pending[row] = pending[row][safe:]
        if all(finished):
            return
    for row in range(len(prompt_ids)):
        if not finished[row]:
            yield row, pending[row] + decoders[row].flush(), None, "length"

