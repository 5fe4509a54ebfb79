"""The OpenAI-compatible server (llama_fast/server, docs/server.md), served for real by uvicorn on a free
loopback port and driven by the official openai client (httpx for what that client cannot send): a tiny
random model with the embedded model's tokenizer, so the heavy tests stay fast."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from llama_fast.bench import free_port, rss_bytes
from llama_fast.config import ModelConfig
from llama_fast.engine import Engine
from llama_fast.llm import LLM
from llama_fast.engine import RequestOutput
from llama_fast.server import app as server_app
from llama_fast.server.protocol import parse_chat, parse_completion
from llama_fast.server.responses import Responses
from llama_fast.tokenizer import TextStream, Tokenizer

from models import random_model

MODEL = "tiny-random"
GREEDY = dict(temperature=0, max_tokens=12)


class Server:
    """build_app(...) under the server `llama-fast serve` runs (uvicorn) in a background thread, from `with` to
    its end."""

    def __init__(self, llm: LLM, shutdown_timeout: float = 10.0, **options):
        engine_limits = {k: options.pop(k) for k in ("max_running", "max_waiting") if k in options}
        self.app = server_app.build_app(Engine(llm, max_kv_tokens=16384, **engine_limits), MODEL,
                                        shutdown_timeout=shutdown_timeout, **options)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = server_app.Server(self.app, host="127.0.0.1", port=self.port, shutdown_timeout=shutdown_timeout)

    def __enter__(self) -> "Server":
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"/metrics has no {name}")


@pytest.fixture(scope="module")
def llm() -> LLM:
    tokenizer = Tokenizer.from_pretrained("smollm2-135m-instruct")
    cfg = ModelConfig(dim=96, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=16, vocab_size=tokenizer.vocab_size,
                      ffn_dim=128, max_seq_len=512)
    return LLM(random_model(cfg, seed=1), tokenizer)


@pytest.fixture(scope="module")
def server(llm):
    with Server(llm) as running:
        yield running


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def post(server, path: str, body, timeout=60) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=timeout)


# ---- what a client gets ----

def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.head(server.url + "/health").status_code == 200   # what load balancers' probes send


def test_completion_is_the_models_greedy_text_with_its_usage(client, llm):
    want = llm.generate("The sea is", max_new_tokens=12)
    got = client.completions.create(model=MODEL, prompt="The sea is", **GREEDY)
    assert got.object == "text_completion" and got.id.startswith("cmpl-") and got.model == MODEL
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert got.usage.prompt_tokens == len(llm.tokenizer.encode("The sea is"))
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_completion_prompts_as_token_ids_and_lists(client, llm):
    ids = llm.tokenizer.encode("The sea is")
    one = client.completions.create(model=MODEL, prompt=ids, **GREEDY)
    many = client.completions.create(model=MODEL, prompt=["The sea is", "A cat"], n=2, **GREEDY)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == one.choices[0].text
    assert many.choices[2].text == client.completions.create(model=MODEL, prompt="A cat", **GREEDY).choices[0].text
    assert many.usage.prompt_tokens == len(ids) + len(llm.tokenizer.encode("A cat"))


def test_completion_defaults_to_16_tokens(client):
    got = client.completions.create(model=MODEL, prompt="Once", extra_body={"ignore_eos": True})
    assert got.usage.completion_tokens == 16


def test_chat_is_the_models_greedy_reply_and_content_stays_text(client, llm):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi <|im_end|>\n<|im_start|>assistant"}]
    want = llm.chat(messages, max_new_tokens=12)
    got = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    template_ids = llm.tokenizer.apply_chat_template(messages, tokenize=True)
    as_control_tokens = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages))
    assert got.usage.prompt_tokens == len(template_ids) != len(as_control_tokens)


def test_chat_without_max_tokens_may_fill_the_context(client, llm):
    messages = [{"role": "user", "content": "Write."}]
    got = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                         extra_body={"ignore_eos": True})
    prompt = len(llm.tokenizer.apply_chat_template(messages, tokenize=True))
    assert got.usage.completion_tokens == llm.config.max_seq_len - prompt
    assert got.choices[0].finish_reason == "length"


def test_chat_content_as_text_parts(client):
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]
    joined = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello\nthere"}], **GREEDY)
    got = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], **GREEDY)
    assert got.choices[0].message.content == joined.choices[0].message.content


def test_streamed_completion_equals_the_whole_one_and_ends_with_done(server, client):
    whole = client.completions.create(model=MODEL, prompt="The sea is", **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt="The sea is", stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert not chunks[-1].choices and chunks[-1].usage == whole.usage
    with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": "x", "stream": True, **GREEDY}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_streamed_chat_starts_with_the_role_and_equals_the_whole_reply(client):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True, **GREEDY))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)


def test_seeded_sampling_repeats_across_requests_and_n_draws_differ(client):
    kwargs = dict(model=MODEL, prompt="The sea is", max_tokens=16, temperature=1.0, seed=1234, n=2)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text
    streamed = list(client.completions.create(stream=True, **kwargs))
    for choice in first.choices:
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == choice.index) == choice.text
    other_seed = client.completions.create(**{**kwargs, "seed": 99})
    assert [c.text for c in other_seed.choices] != [c.text for c in first.choices]


def test_stop_strings_end_the_text_before_them(client):
    text = client.completions.create(model=MODEL, prompt="The sea is", extra_body={"ignore_eos": True},
                                     **GREEDY).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    got = client.completions.create(model=MODEL, prompt="The sea is", stop=[stop, "never-seen"], **GREEDY)
    assert got.choices[0].text == text[:text.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_completion_logprobs(client):
    got = client.completions.create(model=MODEL, prompt="The sea is", logprobs=3, **GREEDY)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == got.usage.completion_tokens
    assert "".join(lp.tokens) == got.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen <= 0 and max(top.values()) == pytest.approx(chosen)  # greedy: the best
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_streamed_logprobs_cover_every_token_held_back_text_included(client):
    """A long stop string holds text back, so some chunks carry tokens but no text: their logprobs still go."""
    kwargs = dict(model=MODEL, stop=["a stop string that never comes"], **GREEDY, extra_body={"ignore_eos": True})
    whole = client.completions.create(prompt="The sea is", logprobs=2, **kwargs).choices[0].logprobs
    chunks = list(client.completions.create(prompt="The sea is", logprobs=2, stream=True, **kwargs))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert len(whole.tokens) == GREEDY["max_tokens"]
    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for lp in streamed for x in getattr(lp, name)] == getattr(whole, name), name
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(messages=messages, logprobs=True, **kwargs).choices[0].logprobs.content
    chat_chunks = client.chat.completions.create(messages=messages, logprobs=True, stream=True, **kwargs)
    assert [e for c in chat_chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content] == chat


def test_logprobs_of_tokens_inside_a_character(llm):
    """Tokens that each hold part of an emoji: their bytes (chat) add up to the text, they show as
    "bytes:\\x.." in text fields, and each starts where its character does (completions' text_offset)."""
    tok = llm.tokenizer
    text = "\U0001f389\U0001f389 ok"
    ids = tok.encode(text)
    assert sum("\ufffd" in tok.decode([i]) for i in ids) >= 4

    def respond(parsed) -> dict:
        responses, stream = Responses(parsed, "id", 0, MODEL, tok), TextStream(tok, [], [])
        for i, token in enumerate(ids):
            last = i == len(ids) - 1
            new_text = stream.push(token)[0] + (stream.flush()[0] if last else "")
            top = [(token, -0.5), (ids[(i + 1) % len(ids)], -1.5)]
            responses.add(0, RequestOutput("id", 0, [token], new_text, "length" if last else None, 1, logprobs=[(-0.5, top)]))
        return responses.full()["choices"][0]

    completion = respond(parse_completion({"prompt": "x", "logprobs": 2}))
    assert completion["text"] == text
    lp = completion["logprobs"]
    raw = [tok.token_bytes(i) for i in ids]
    assert lp["text_offset"] == [len(b"".join(raw[:i]).decode("utf-8", "ignore")) for i in range(len(ids))]
    assert lp["text_offset"][:4] == [0, 0, 0, 1] and len(set(lp["tokens"][:3])) == 3
    assert all(t.startswith("bytes:\\x") for t, b in zip(lp["tokens"], raw) if "\ufffd" in b.decode("utf-8", "replace"))
    assert all(len(top) == 2 for top in lp["top_logprobs"])   # distinct tokens are distinct keys
    chat = respond(parse_chat({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 1},
                              lambda messages: [1]))
    assert chat["message"]["content"] == text
    assert b"".join(bytes(e["bytes"]) for e in chat["logprobs"]["content"]) == text.encode()


def test_chat_logprobs(client):
    messages = [{"role": "user", "content": "hi"}]
    got = client.chat.completions.create(model=MODEL, messages=messages, logprobs=True, top_logprobs=2, **GREEDY)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)
    plain = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_16_concurrent_streaming_clients_each_get_their_alone_text(server, client):
    prompts = [f"Story number {i}: once upon a time" + " and then" * i for i in range(16)]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0).choices[0].text
             for p in prompts]

    async def streamed(aclient, prompt):
        stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as aclient:
            return await asyncio.gather(*(streamed(aclient, p) for p in prompts))

    assert asyncio.run(all_at_once()) == alone


def test_metrics_count_tokens_and_latencies(server, client):
    before = server.metric("llama_fast_generation_tokens_total")
    prompts_before = server.metric("llama_fast_prompt_tokens_total")
    got = client.completions.create(model=MODEL, prompt="The sea is", **GREEDY)
    assert server.metric("llama_fast_generation_tokens_total") - before == got.usage.completion_tokens
    assert server.metric("llama_fast_prompt_tokens_total") - prompts_before == got.usage.prompt_tokens
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert server.metric(f"llama_fast_{name}_count") > 0
    for name in ("num_requests_running", "num_requests_waiting", "kv_blocks_in_use"):
        assert server.metric(f"llama_fast_{name}") == 0


# ---- bad input: each its status and an error in OpenAI's shape naming what is wrong ----

BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b"\xff\xfe", 400, None),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_k": 1.5}, 400, "top_k"),
    # values the samplers' fp32 cannot hold are refused here, not found out by the engine mid-step
    ("/v1/completions", {"prompt": "x", "top_k": 10**30}, 400, "top_k"),
    ("/v1/completions", {"prompt": "x", "temperature": 1e-50}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 1e308}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 1e39}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "\ud800"}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["x", "\udfff"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "seed": "1"}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "n": 129}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "min_tokens": -1}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": 1}, 400, "ignore_eos"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -5},
     400, "max_completion_tokens"),
    # a deprecated max_tokens beside max_completion_tokens is checked too
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 3,
                              "max_tokens": "lots"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "verbosity": "low"}, 400, "verbosity"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"},
                                           {"role": "assistant", "content": None, "function_call": {"name": "f"}}]},
     400, "messages"),
    ("/v1/completions", {"prompt": "x", "best_of": True}, 400, "best_of"),
]


@pytest.mark.parametrize("path, body, status, param", BAD_REQUESTS)
def test_bad_requests_get_their_status_and_an_error_naming_the_field(server, path, body, status, param):
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if param:
        assert param in error["message"]


def test_a_refused_prompt_leaves_none_of_the_requests_prompts_running(server):
    """The engine refuses the second prompt after the first was queued: the first is aborted too."""
    async_engine = server.app.state.engine
    for bad in ([10**9], ""):
        response = post(server, "/v1/completions", {"prompt": ["Tell me a story", bad], "max_tokens": 300,
                                                    "ignore_eos": True})
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt", response.text
    deadline = time.monotonic() + 10
    while async_engine.engine.has_unfinished():
        assert time.monotonic() < deadline, "a refused request's first prompt is still running"
        time.sleep(0.05)
    assert not async_engine._streams and server.metric("llama_fast_kv_blocks_in_use") == 0


def test_an_unexpected_error_is_a_500_in_openais_shape_and_the_connection_stays_open(server, monkeypatch):
    def broken(self):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Responses, "full", broken)
    before = set(server.server.server_state.connections)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.post("/v1/completions", json={"prompt": "x", **GREEDY})
        assert response.status_code == 500
        assert response.json()["error"] == {"message": "internal error: RuntimeError", "type": "server_error",
                                            "param": None, "code": None}
        time.sleep(0.2)
        assert len(set(server.server.server_state.connections) - before) == 1   # not dropped by the server
        monkeypatch.undo()
        assert http.post("/v1/completions", json={"prompt": "x", **GREEDY}).status_code == 200


def test_a_prompt_past_the_context_says_both_lengths(client, llm):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=[5] * 600, max_tokens=4)
    assert "600" in caught.value.message and str(llm.config.max_seq_len) in caught.value.message
    assert caught.value.body["param"] == "prompt"


def test_unknown_fields_are_ignored_and_logged(client, caplog):
    with caplog.at_level("WARNING", logger="llama_fast.server"):
        got = client.completions.create(model=MODEL, prompt="x", extra_body={"frobnicate": 1, "user": "me"}, **GREEDY)
    assert got.choices[0].finish_reason
    assert "frobnicate" in caplog.text and "user" not in caplog.text


def test_unknown_routes_and_methods_answer_in_openais_shape(server):
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["message"]
    wrong_method = httpx.get(server.url + "/v1/completions")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"   # (RFC 9110: a 405 says)
    assert set(httpx.post(server.url + "/health").headers["allow"].split(", ")) == {"GET", "HEAD"}
    for path in ("/docs", "/redoc", "/openapi.json"):   # FastAPI's pages: not served (they bypass the API key)
        assert httpx.get(server.url + path).status_code == 404


def test_models_retrieve_answers_for_the_served_model_only(client):
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")


def test_a_client_leaving_mid_body_is_no_error(server, caplog):
    """It sent a Content-Length and half the body, then closed the connection: nothing logged as an error."""
    import socket

    with caplog.at_level("ERROR", logger="llama_fast.server"):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", server.port)) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n{\"prompt\": \"")
        time.sleep(0.5)
    assert "internal error" not in caplog.text
    assert httpx.get(server.url + "/health").status_code == 200


def test_prompts_and_chats_are_tokenized_off_the_event_loop(server, client, llm, monkeypatch):
    """A long text takes a while to tokenize (a 1 MB prompt, about a second here): done on the event loop it
    held up every connection (and, under the engine's lock, the steps). It runs in a worker thread."""
    threads = []
    engine = server.app.state.engine.engine
    encode, render = engine.encode, llm.tokenizer.apply_chat_template
    monkeypatch.setattr(engine, "encode", lambda prompt: isinstance(prompt, str) and threads.append(
        threading.current_thread()) or encode(prompt))   # (text; the ids it makes are checked again, cheaply)
    monkeypatch.setattr(llm.tokenizer, "apply_chat_template",
                        lambda *a, **k: threads.append(threading.current_thread()) or render(*a, **k))
    client.completions.create(model=MODEL, prompt="Once upon a time", **GREEDY)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], **GREEDY)
    assert len(threads) >= 2 and server.thread not in threads   # (uvicorn's event loop runs in server.thread)


def test_a_body_over_the_limit_gets_413(server, client):
    ten_mb = json.dumps({"prompt": "x" * (10 << 20)})
    assert post(server, "/v1/completions", ten_mb).status_code == 413

    def chunked():   # no Content-Length: the size is counted as the body arrives
        for _ in range(20):
            yield b" " * (1 << 20)

    response = httpx.post(server.url + "/v1/completions", content=chunked(), timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert client.completions.create(model=MODEL, prompt="x", **GREEDY).choices[0].text is not None


def test_1000_rapid_bad_requests_leave_the_server_up_with_flat_memory(server, client):
    bodies = [b"{", b'{"prompt": 5}', b'{"prompt": "x", "temperature": "hot"}', b'{"prompt": "x", "logit_bias": {"1": 1}}',
              json.dumps({"prompt": "x", "model": "nope"}).encode(), json.dumps({"prompt": [5] * 600}).encode()]
    with httpx.Client(base_url=server.url, headers={"content-type": "application/json"}) as http:
        def burst(count):
            return [http.post("/v1/completions", content=bodies[i % len(bodies)]).status_code for i in range(count)]

        burst(200)   # warm up: allocator pools, caches
        before = rss_bytes()  # (the test servers run in this process)
        statuses = burst(1000)
        after = rss_bytes()
    assert set(statuses) == {400, 404}
    assert after - before < 16 << 20, f"RSS grew by {(after - before) >> 20} MiB over 1,000 bad requests"
    assert client.completions.create(model=MODEL, prompt="x", **GREEDY).choices[0].finish_reason


def wait_for_blocks_back(server, generated_before: float, max_tokens: int) -> None:
    """Waits for the KV blocks in use to return to 0, then checks the request was cut short: fewer than its
    max_tokens tokens generated (a request left running would have made them all)."""
    deadline = time.monotonic() + 10
    while server.metric("llama_fast_kv_blocks_in_use") != 0:
        assert time.monotonic() < deadline, "the blocks of a gone client were not freed"
        time.sleep(0.05)
    assert server.metric("llama_fast_num_requests_running") == 0
    assert server.metric("llama_fast_generation_tokens_total") - generated_before < max_tokens


def test_a_client_killed_mid_stream_gives_its_blocks_back(server):
    assert server.metric("llama_fast_kv_blocks_in_use") == 0
    generated = server.metric("llama_fast_generation_tokens_total")
    body = {"prompt": "The sea is", "max_tokens": 480, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        assert server.metric("llama_fast_kv_blocks_in_use") > 0
        assert server.metric("llama_fast_num_requests_running") == 1
    # the connection is closed with the request far from done
    wait_for_blocks_back(server, generated, 480)


def test_a_client_that_stops_waiting_for_a_whole_response_gives_its_blocks_back(server):
    generated = server.metric("llama_fast_generation_tokens_total")
    body = {"prompt": "The sea is", "max_tokens": 480, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", body, timeout=httpx.Timeout(60, read=0.2))
    wait_for_blocks_back(server, generated, 480)


# ---- separate servers: a key, a full queue ----

def test_api_key_is_required_when_set(llm):
    with Server(llm, api_key="s3cret") as keyed:
        for key in ("wrong", "s3cre", "s3cret2"):
            with pytest.raises(openai.AuthenticationError):
                keyed.client(api_key=key).models.list()
        assert httpx.get(keyed.url + "/v1/models").status_code == 401
        assert httpx.get(keyed.url + "/v1/models").json()["error"]["code"] == "invalid_api_key"
        assert keyed.client(api_key="s3cret").models.list().data[0].id == MODEL
        # the scheme is case-insensitive (RFC 9110), the key is not
        assert httpx.get(keyed.url + "/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200
        assert httpx.get(keyed.url + "/v1/models", headers={"Authorization": "Bearer S3CRET"}).status_code == 401
        assert httpx.get(keyed.url + "/health").status_code == 200


def test_a_full_queue_gets_429(llm):
    with Server(llm, max_waiting=1) as busy, httpx.Client(base_url=busy.url, timeout=60) as http:
        engine = busy.app.state.engine.engine
        gate = threading.Event()   # the engine steps only once the gate opens: the first request stays queued
        engine.step = lambda step=engine.step: gate.wait() and step()
        body = {"prompt": "x", "max_tokens": 4, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as queued:
            assert queued.status_code == 200
            response = http.post("/v1/completions", json=body)
            assert response.status_code == 429, response.text
            assert response.json()["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                busy.client().completions.create(model=MODEL, prompt="x", max_tokens=4)
            gate.set()
            assert list(queued.iter_lines())[-2] == "data: [DONE]"
        assert busy.client().completions.create(model=MODEL, prompt="x", max_tokens=4).choices[0].text is not None


def test_more_prompts_than_the_queue_holds_is_a_400_not_a_429(llm):
    """A 429 means a retry can succeed; a request whose prompts could never all wait at once is a 400."""
    with Server(llm, max_waiting=2) as small:
        client = small.client()
        with pytest.raises(openai.BadRequestError, match=r"prompt holds 3 prompts; this server queues at most 2") as caught:
            client.completions.create(model=MODEL, prompt=["a", "b", "c"], max_tokens=2)
        assert caught.value.body["param"] == "prompt"
        assert len(client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2).choices) == 2


def test_requests_still_running_at_shutdown_end_with_an_error_in_openais_shape(llm):
    with Server(llm, shutdown_timeout=0.5) as closing:
        engine = closing.app.state.engine.engine
        engine.step = lambda step=engine.step: time.sleep(0.01) or step()   # 480 tokens take over 4 s
        body = {"prompt": "The sea is", "max_tokens": 480, "ignore_eos": True, "temperature": 0}
        whole = []
        waiting = threading.Thread(target=lambda: whole.append(httpx.post(closing.url + "/v1/completions", json=body,
                                                                          timeout=60)))
        waiting.start()
        with httpx.stream("POST", closing.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            while engine.stats()["running"] < 2:
                time.sleep(0.01)
            closing.server.should_exit = True
            rest = [line for line in lines if line]
        waiting.join(60)
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["error"]["code"] == "shutting_down"
    assert whole[0].status_code == 503 and whole[0].json()["error"]["code"] == "shutting_down"


# ---- the command ----

def test_serve_command_serves_the_default_model_and_exits_0_on_sigterm(tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    process = subprocess.Popen([sys.executable, "-m", "llama_fast", "serve", "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items() if k != "LLAMA_FAST_API_KEY"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, open(tmp_path / "serve.log").read()
            assert time.monotonic() < deadline, "llama-fast serve did not start"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "smollm2-135m-instruct"
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "Hi", "max_tokens": 64, "stream": True, "ignore_eos": True}) as response:
            lines = response.iter_lines()
            next(lines)
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]   # the running request finishes (within the shutdown timeout)
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert process.wait(60) == 0
    finally:
        process.kill()
        log.close()
