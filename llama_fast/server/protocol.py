"""The OpenAI API's request bodies as typed requests, and its error shape (docs/server.md).

Each field is checked with llama_fast's own rules (validate.py, SamplingParams), its errors turned into
400s that name the field. Fields are OpenAI's, with its defaults when omitted or null, plus vLLM's extras
(top_k, min_p, repetition_penalty, ignore_eos, min_tokens). A field that would change the result but is not
implemented is a 400 naming it; any other unknown field is ignored and logged, as vLLM does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from .. import validate
from ..sampling import MAX_LOGPROBS, SamplingParams

log = logging.getLogger("llama_fast.server")

# OpenAI's bound on n: a request's choices are forked sequences, each taking KV blocks and a batch slot.
MAX_N = 128

# Fields that change the result and are not implemented: each is refused unless it holds its no-op value.
UNIMPLEMENTED = {
    "logit_bias": lambda v: v == {}, "tools": lambda v: v == [], "tool_choice": lambda v: v == "none",
    "functions": lambda v: v == [], "function_call": lambda v: v == "none",
    "parallel_tool_calls": lambda v: isinstance(v, bool),   # a no-op: tools are refused
    "response_format": lambda v: v == {"type": "text"}, "echo": lambda v: v is False, "suffix": lambda v: False,
    "best_of": lambda v: v == 1 and not isinstance(v, bool), "audio": lambda v: False,
    "modalities": lambda v: v == ["text"], "prediction": lambda v: False, "web_search_options": lambda v: False,
    "reasoning_effort": lambda v: False, "verbosity": lambda v: v == "medium",
}
# The roles OpenAI's chat API knows; the chat template renders them as they are.
ROLES = ("system", "developer", "user", "assistant", "tool")
# Fields of the API that do not change the result here (OpenAI uses them for its own records).
NO_EFFECT = {"user", "store", "metadata", "service_tier"}

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed")
COMMON_FIELDS = {"model", "max_tokens", "n", "stop", "stream", "stream_options", "logprobs", "ignore_eos",
                 "min_tokens", *SAMPLING_FIELDS}


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class GenerationRequest:
    """A checked /v1/completions or /v1/chat/completions request. prompts: the completion's prompts (text or
    token ids), or the chat's one prompt as the template's token ids; max_tokens None: up to the context."""

    chat: bool
    model: str | None
    prompts: list[str | list[int]]
    params: SamplingParams
    max_tokens: int | None
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None       # top logprobs per token (0: the chosen token's only); None: no logprobs
    ignore_eos: bool
    min_tokens: int

    @property
    def prompt_field(self) -> str:
        """The body's field holding the prompt, for errors about it."""
        return "messages" if self.chat else "prompt"


def parse_completion(body: Any) -> GenerationRequest:
    """POST /v1/completions' body -> its request (APIError 400 naming the field at fault)."""
    fields = _Fields(body, known=COMMON_FIELDS | {"prompt"})
    prompts, _ = fields.get("prompt", validate.prompts, required=True)
    logprobs = fields.get("logprobs", lambda v, a: validate.integer(v, a, minimum=0, maximum=MAX_LOGPROBS))
    return _request(fields, chat=False, prompts=prompts, logprobs=logprobs,
                    max_tokens=fields.get("max_tokens", _max_tokens, default=16))


def parse_chat(body: Any, render_chat: Callable[[list[dict]], list[int]]) -> GenerationRequest:
    """POST /v1/chat/completions' body -> its request; render_chat(messages) -> the prompt's token ids (the
    chat template's markup as control tokens, message content always as text)."""
    fields = _Fields(body, known=COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"})
    messages = fields.get("messages", _chat_messages, required=True)
    try:
        prompt = render_chat(messages)
    except Exception as err:  # the template's own errors (raise_exception, jinja2's) are the messages' fault
        raise APIError(400, f"messages cannot be rendered with the model's chat template: {err}", "messages")
    wants_logprobs = fields.get("logprobs", _boolean, default=False)
    top = fields.get("top_logprobs", lambda v, a: validate.integer(v, a, minimum=0, maximum=MAX_LOGPROBS))
    if top is not None and not wants_logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
    # max_completion_tokens replaces the deprecated max_tokens (both checked); without either a reply may
    # fill the context.
    deprecated = fields.get("max_tokens", _max_tokens)
    max_tokens = fields.get("max_completion_tokens", _max_tokens, default=deprecated)
    return _request(fields, chat=True, prompts=[prompt], logprobs=(top or 0) if wants_logprobs else None,
                    max_tokens=max_tokens)


def _request(fields: "_Fields", *, chat, prompts, logprobs, max_tokens) -> GenerationRequest:
    n = fields.get("n", lambda v, a: validate.integer(v, a, minimum=1, maximum=MAX_N), default=1)
    stop = fields.get("stop", _stop, default=[])
    stream = fields.get("stream", _boolean, default=False)
    options = fields.get("stream_options", _stream_options)
    if options is not None and not stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    sampling = {name: fields.get(name, lambda v, a: v) for name in SAMPLING_FIELDS}
    sampling = {name: value for name, value in sampling.items() if value is not None}
    try:
        params = SamplingParams(**{"temperature": 1.0, "top_p": 1.0, **sampling, "logprobs": logprobs})
    except ValueError as err:  # "SamplingParams.top_p must be ...": the API's field has the same name
        message = str(err).removeprefix("SamplingParams.")
        raise APIError(400, message, message.split()[0]) from None
    fields.log_ignored()
    return GenerationRequest(
        chat=chat, model=fields.get("model", _string), prompts=prompts, params=params, max_tokens=max_tokens,
        n=n, stop=stop, stream=stream, include_usage=bool(options and options.get("include_usage")),
        logprobs=logprobs, ignore_eos=fields.get("ignore_eos", _boolean, default=False),
        min_tokens=fields.get("min_tokens", lambda v, a: validate.integer(v, a, minimum=0), default=0))


class _Fields:
    """A JSON object's fields, each read through a check that raises ValueError naming it; null means
    omitted. Unimplemented fields are refused at once."""

    def __init__(self, body: Any, known: set[str]):
        if not isinstance(body, dict):
            raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        self.body, self.known = body, known
        for name, is_no_op in UNIMPLEMENTED.items():
            value = body.get(name)
            if value is not None and not is_no_op(value):
                raise APIError(400, f"{name} is not supported by this server", name)

    def get(self, name: str, check: Callable[[Any, str], Any], *, default=None, required=False):
        value = self.body.get(name)
        if value is None:
            if required:
                raise APIError(400, f"{name} is required", name)
            return default
        try:
            return check(value, name)
        except ValueError as err:
            raise APIError(400, str(err), name) from None

    def log_ignored(self) -> None:
        ignored = sorted(set(self.body) - self.known - set(UNIMPLEMENTED) - NO_EFFECT)
        if ignored:
            log.warning("ignored unknown request fields: %s", ", ".join(ignored))


def _boolean(value, argument: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{argument} must be true or false, got {value!r}")
    return value


def _string(value, argument: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{argument} must be a string, got {value!r}")
    return value


def _max_tokens(value, argument: str) -> int:
    return validate.integer(value, argument, minimum=1)


def _stop(value, argument: str) -> list[str]:
    validate.stop(value, argument)
    stops = [value] if isinstance(value, str) else list(value)
    if not all(stops):
        raise ValueError(f"{argument} strings must be non-empty")
    return stops


def _stream_options(value, argument: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{argument} must be an object, got {value!r}")
    if value.get("include_usage") is not None:
        _boolean(value["include_usage"], f"{argument}.include_usage")
    return value


def _chat_messages(value, argument: str) -> list[dict]:
    """OpenAI's messages -> [{"role", "content"}] with content as one text: a string, or a list of text
    parts joined by newlines (as vLLM joins them); images, audio and tool calls are not supported."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{argument} must be a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        where = f"{argument}[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with role and content, got {message!r}")
        for field in ("tool_calls", "function_call"):   # (an assistant's calls: its content may be null then)
            if message.get(field):
                raise ValueError(f"{where}.{field} is not supported by this server")
        if isinstance(message.get("role"), str) and message["role"] not in ROLES:
            raise ValueError(f"{where}.role must be one of {', '.join(ROLES)}, got {message['role']!r}")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError(f"{where}.content[{j}] must be a text part ({{'type': 'text', 'text': str}}); "
                                     f"other parts are not supported, got {part!r}"[:300])
            content = "\n".join(part["text"] for part in content)
        out.append({"role": message.get("role"), "content": content})
    return validate.messages(out, argument)
