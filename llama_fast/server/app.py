"""The OpenAI-compatible HTTP server: a FastAPI app over the engine's asyncio wrapper (docs/server.md).

The engine steps in its own thread (AsyncEngine); each HTTP request is one engine request per prompt, its
outputs streamed back as server-sent events or gathered into one response. A client that goes away
cancels its handler, which closes its engine streams, which aborts its requests.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
import uuid

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ..engine import AsyncEngine, Engine
from ..errors import EngineClosedError, QueueFullError
from .metrics import Metrics
from .protocol import APIError, GenerationRequest, parse_chat, parse_completion
from .responses import Responses

log = logging.getLogger("llama_fast.server")

DEFAULT_MAX_BODY_BYTES = 1 << 20


def build_app(engine: Engine, served_model_name: str, *, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, shutdown_timeout: float = 10.0) -> FastAPI:
    """The app serving `engine` as model `served_model_name`. With api_key, /v1/* needs
    "Authorization: Bearer <api_key>". On shutdown, what still runs is finished or aborted within
    shutdown_timeout seconds."""
    async_engine = AsyncEngine(engine)
    metrics = Metrics(async_engine.stats)
    llm = engine.llm
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await async_engine.shutdown(shutdown_timeout)

    # (No /docs, /redoc or /openapi.json: they would be served without the API key, and are not OpenAI's.)
    app = FastAPI(title="llama_fast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.router.route_class = AnsweringRoute
    app.state.engine = async_engine   # for tests, embedding code and Server

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)   # unknown routes and methods, in OpenAI's shape too
    async def http_error(request: Request, err: HTTPException):
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code,
                            headers=err.headers)   # (a 405's Allow)

    @app.exception_handler(Exception)   # outside any route (AnsweringRoute answers those)
    async def unexpected_error(request: Request, err: Exception):
        log.exception("internal error serving %s", request.url.path)
        return JSONResponse(internal_error(err).body(), status_code=500)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)], route_class=AnsweringRoute)

    model_card = {"id": served_model_name, "object": "model", "created": created, "owned_by": "llama_fast",
                  "max_model_len": llm.config.max_seq_len}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @v1.get("/models/{model:path}")   # (:path: an id may hold slashes, as "org/name" does)
    async def model(model: str):
        if model != served_model_name:
            raise not_served(model, served_model_name)
        return model_card

    @v1.post("/completions")
    async def completions(request: Request):
        parsed = parse_completion(await read_json(request, max_body_bytes))
        return await serve(request, parsed, "cmpl")

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        render = lambda messages: llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                    tokenize=True)
        # Rendered in a worker thread: a long chat takes a while to tokenize, and the event loop serves everyone.
        parsed = await asyncio.to_thread(parse_chat, await read_json(request, max_body_bytes), render)
        return await serve(request, parsed, "chatcmpl")

    async def serve(request: Request, parsed: GenerationRequest, prefix: str):
        if parsed.model is not None and parsed.model != served_model_name:
            raise not_served(parsed.model, served_model_name)
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        timer = metrics.timer()
        streams = await start(async_engine, parsed, request_id)
        responses = Responses(parsed, request_id, int(time.time()), served_model_name, llm.tokenizer)
        outputs = merged(streams)
        if parsed.stream:
            return StreamingResponse(stream_events(responses, outputs, timer), media_type="text/event-stream")
        return await cancelled_on_disconnect(request, gather(responses, outputs, timer))

    app.include_router(v1)
    return app


def not_served(model: str, served_model_name: str) -> APIError:
    return APIError(404, f"the model {model!r} does not exist; this server serves {served_model_name!r}", "model",
                    "model_not_found")


def internal_error(err: Exception) -> APIError:
    return APIError(500, f"internal error: {type(err).__name__}")


class AnsweringRoute(APIRoute):
    """A route whose unexpected errors are answered here as OpenAI-shaped 500s. Starlette's handler of last
    resort answers too, but then re-raises, and uvicorn drops the connection: the client's next request on
    it would fail."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except (APIError, HTTPException):   # answered by the app's handlers
                raise
            except Exception as err:
                log.exception("internal error serving %s", request.url.path)
                return JSONResponse(internal_error(err).body(), status_code=500)

        return answer


class Server(uvicorn.Server):
    """uvicorn's server for the app: on SIGTERM or SIGINT it drains the engine while uvicorn drains its
    connections, so requests still running after shutdown_timeout are aborted by the engine, each client
    told so (a 503, or an error event ending its stream), before uvicorn would cut what is left."""

    def __init__(self, app: FastAPI, *, host: str, port: int, shutdown_timeout: float):
        # uvicorn's own limit comes later: time for the aborted requests' last words to go out
        super().__init__(uvicorn.Config(app, host=host, port=port, log_level="info",
                                        timeout_graceful_shutdown=math.ceil(shutdown_timeout) + 5))
        self.engine, self.shutdown_timeout = app.state.engine, shutdown_timeout

    async def shutdown(self, sockets=None) -> None:
        await asyncio.gather(self.engine.shutdown(self.shutdown_timeout), super().shutdown(sockets))


async def read_json(request: Request, limit: int):
    """The request's JSON body: 413 past `limit` bytes (told by Content-Length or counted as it arrives,
    so a body without one cannot grow memory either), 400 when it is not JSON."""
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body is over the server's limit of {limit} bytes",
                         code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
    except ClientDisconnect:   # the client left while sending: nobody reads the answer (nginx's 499)
        raise APIError(499, "the client closed the connection before its request body was complete") from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as err:   # RecursionError: JSON nested too deep to parse
        raise APIError(400, f"the request body is not valid JSON: {err}"[:300]) from None


async def start(async_engine: AsyncEngine, parsed: GenerationRequest, request_id: str) -> list:
    """One engine request per prompt; its checks' errors as API errors (nothing is left queued then). The
    prompts wait together: more than max_waiting of them is a 400, as no retry would fit them."""
    engine, streams = async_engine.engine, []
    if engine.max_waiting is not None and len(parsed.prompts) > engine.max_waiting:
        raise APIError(400, f"{parsed.prompt_field} holds {len(parsed.prompts)} prompts; this server queues at "
                            f"most {engine.max_waiting} at once (--max-waiting)", parsed.prompt_field)
    try:
        # Tokenized in a worker thread: a long text takes a while, and the event loop serves everyone.
        prompts = await asyncio.to_thread(lambda: [engine.encode(prompt) for prompt in parsed.prompts])
        for i, prompt in enumerate(prompts):
            # Without max_tokens (a chat's default) the replies may fill what the context leaves and the KV
            # pool holds for all n.
            streams.append(async_engine.generate(
                prompt, parsed.params, max_new_tokens=parsed.max_tokens, stop=parsed.stop or None, n=parsed.n,
                request_id=f"{request_id}-{i}", ignore_eos=parsed.ignore_eos, min_tokens=parsed.min_tokens))
    except (ValueError, QueueFullError, EngineClosedError) as err:
        for stream in streams:
            await stream.aclose()
        raise engine_error(err, parsed) from None
    return streams


def engine_error(err: Exception, parsed: GenerationRequest) -> APIError:
    """The engine's refusal of a request (its messages name its own arguments) as an API error naming the
    request's field."""
    if isinstance(err, QueueFullError):
        return APIError(429, f"the server is busy: {err}", code="queue_full")
    if isinstance(err, EngineClosedError):
        return shutting_down("it takes no new requests")
    message = str(err).replace("max_new_tokens", "max_tokens")
    name = message.split()[0]
    if name in ("max_tokens", "stop", "n", "seed", "min_tokens"):
        return APIError(400, message, name)
    # the prompt past the context, or with its max_tokens past the KV cache
    return APIError(400, message, parsed.prompt_field, "context_length_exceeded" if "context" in message else None)


def shutting_down(why: str) -> APIError:
    return APIError(503, f"the server is shutting down: {why}", code="shutting_down")


async def merged(streams: list):
    """(prompt index, RequestOutput) from every prompt's stream as they come. Leaving early (a client gone,
    an error) closes every stream, which aborts what still runs. An aborted sequence raises: the only abort
    a reader can see is the engine's at shutdown (a client that left reads nothing)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
            await queue.put((i, done))
        except Exception as err:   # handed to the consumer, which raises it
            await queue.put((i, err))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            elif item.finish_reason == "abort":
                raise shutting_down("this request was aborted before it finished")
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def gather(responses: Responses, outputs, timer) -> dict:
    async for prompt, out in outputs:
        responses.add(prompt, out)
        timer.tokens((prompt, out.index), len(out.new_token_ids), out.num_prompt_tokens)
    timer.finished()
    return responses.full()


async def stream_events(responses: Responses, outputs, timer):
    """The response as server-sent events: a chunk per output, the usage chunk when asked, [DONE]. An
    error after the stream began is sent as an error event (the status line is already out)."""
    try:
        async for prompt, out in outputs:
            choice, first = responses.add(prompt, out)
            timer.tokens((prompt, out.index), len(out.new_token_ids), out.num_prompt_tokens)
            if out.new_text or out.finish_reason or first or out.logprobs:
                yield sse(responses.chunk(choice, out, first))
        timer.finished()
        if responses.request.include_usage:
            yield sse(responses.usage_chunk())
    except APIError as err:
        yield sse(err.body())
    except Exception as err:
        log.exception("error while streaming %s", responses.id)
        yield sse(internal_error(err).body())
    yield "data: [DONE]\n\n"


def sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def cancelled_on_disconnect(request: Request, work):
    """Awaits `work`, cancelled (and its engine requests aborted) if the client disconnects first: Starlette
    notices a gone client only while it streams a response, not while a handler computes one."""
    task = asyncio.ensure_future(work)

    async def watch() -> bool:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()
        return True

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done():   # the client left: nobody reads this answer (nginx's "client closed request")
            return Response(status_code=499)
        raise
    finally:
        watcher.cancel()
