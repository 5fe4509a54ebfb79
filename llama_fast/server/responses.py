"""The OpenAI API's response bodies and stream chunks, built from the engine's RequestOutputs."""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from ..tokenizer import Tokenizer
from .protocol import GenerationRequest


@dataclass
class Choice:
    """One sequence of a request as it grows: choice `index` = prompt * n + the sequence's index."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)   # per token: (chosen token's logprob, [(id, logprob)] top)
    finish_reason: str | None = None
    offsets: list[int] = field(default_factory=list)   # with logprobs: where each token starts in the text
    _chars: int = 0   # characters the tokens' bytes have made so far
    _utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    def add(self, out, token_bytes=None) -> None:
        """Adds a RequestOutput; token_bytes(id) -> the token's bytes, given when its offsets are wanted."""
        self.text += out.new_text
        self.token_ids += out.new_token_ids
        self.logprobs += out.logprobs or []
        self.finish_reason = out.finish_reason
        for token in out.new_token_ids if token_bytes else ():
            self.offsets.append(self._chars)   # a token inside a character starts where that character does
            self._chars += len(self._utf8.decode(token_bytes(token)))


class Responses:
    """One request's choices as its outputs arrive, and its bodies: the full response, the stream's chunks
    and its usage."""

    def __init__(self, request: GenerationRequest, request_id: str, created: int, model: str, tokenizer: Tokenizer):
        self.request, self.id, self.created, self.model, self.tokenizer = request, request_id, created, model, tokenizer
        self.object = "chat.completion" if request.chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if request.chat else "text_completion"
        self.choices: dict[int, Choice] = {}
        self.prompt_tokens: dict[int, int] = {}   # prompt index -> its length in tokens

    def add(self, prompt: int, out) -> tuple[Choice, bool]:
        """Adds an output of prompt number `prompt`: its Choice (index prompt * n + the sequence's index),
        and whether this was the choice's first output."""
        index = prompt * self.request.n + out.index
        first = index not in self.choices
        choice = self.choices.setdefault(index, Choice(index))
        wants_offsets = self.request.logprobs is not None and not self.request.chat
        choice.add(out, self.tokenizer.token_bytes if wants_offsets else None)
        self.prompt_tokens[prompt] = out.num_prompt_tokens
        return choice, first

    def usage(self) -> dict:
        prompt = sum(self.prompt_tokens.values())
        completion = sum(len(c.token_ids) for c in self.choices.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _base(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def full(self) -> dict:
        choices = [self.choices[i] for i in sorted(self.choices)]
        return {**self._base(self.object), "choices": [
            self._choice(c, c.text, c.token_ids, c.logprobs, c.finish_reason, c.offsets) for c in choices],
            "usage": self.usage()}

    def chunk(self, choice: Choice, out, first: bool) -> dict:
        """The stream chunk of one RequestOutput of `choice` (already added); first: the choice's first
        chunk, which in a chat carries the assistant role."""
        offsets = choice.offsets[len(choice.offsets) - len(out.new_token_ids):]
        body = self._choice(choice, out.new_text, out.new_token_ids, out.logprobs or [], out.finish_reason, offsets,
                            delta=True)
        if first and self.request.chat:
            body["delta"] = {"role": "assistant", **body["delta"]}
        chunk = {**self._base(self.chunk_object), "choices": [body]}
        if self.request.include_usage:   # OpenAI: then every chunk has a usage field, null but in the last
            chunk["usage"] = None
        return chunk

    def usage_chunk(self) -> dict:
        """The stream's last chunk when stream_options.include_usage asks: no choices, the usage."""
        return {**self._base(self.chunk_object), "choices": [], "usage": self.usage()}

    def _choice(self, choice: Choice, text: str, token_ids: list[int], logprobs: list, finish_reason,
                offsets: list[int], delta=False) -> dict:
        wanted = self.request.logprobs is not None
        if not self.request.chat:
            return {"index": choice.index, "text": text, "finish_reason": finish_reason,
                    "logprobs": self._completion_logprobs(token_ids, logprobs, offsets) if wanted else None}
        message = {"content": text} if delta else {"role": "assistant", "content": text}
        return {"index": choice.index, "delta" if delta else "message": message, "finish_reason": finish_reason,
                "logprobs": {"content": self._chat_logprobs(token_ids, logprobs)} if wanted else None}

    def _token(self, token_id: int) -> tuple[str, bytes]:
        """A token as the logprobs show it: its text, or for part of a character "bytes:\\xNN..." (the form
        OpenAI's API gives such tokens), and its bytes."""
        raw = self.tokenizer.token_bytes(token_id)
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw

    def _completion_logprobs(self, token_ids: list[int], logprobs: list, offsets: list[int]) -> dict:
        """The completions API's logprobs: tokens, token_logprobs, top_logprobs, text_offset (from the
        start of the choice's text)."""
        return {"tokens": [self._token(token_id)[0] for token_id in token_ids],
                "token_logprobs": [chosen for chosen, _ in logprobs],
                "top_logprobs": [{self._token(t)[0]: lp for t, lp in top} for _, top in logprobs],
                "text_offset": offsets}

    def _chat_logprobs(self, token_ids: list[int], logprobs: list) -> list[dict]:
        def entry(token_id: int, logprob: float) -> dict:
            token, raw = self._token(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(raw)}

        return [{**entry(token_id, chosen), "top_logprobs": [entry(t, lp) for t, lp in top]}
                for token_id, (chosen, top) in zip(token_ids, logprobs)]
